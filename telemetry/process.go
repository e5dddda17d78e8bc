package telemetry

import "github.com/prometheus/client_golang/prometheus"

// NewProcessCollector returns a collector of the process's own series:
// process_cpu_seconds_total, process_resident_memory_bytes,
// process_virtual_memory_bytes, process_virtual_memory_max_bytes,
// process_open_fds, process_max_fds and process_start_time_seconds, the
// names Prometheus' own process collector uses. On Linux it reads them
// with system calls into buffers it keeps, where client_golang's parses
// several files of /proc on every scrape (about 57 KB of garbage each,
// which an idle agent holds until its next collection); elsewhere it is
// client_golang's.
func NewProcessCollector() prometheus.Collector { return newProcessCollector() }
