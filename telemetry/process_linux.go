package telemetry

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/rawfs"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// processCollector is NewProcessCollector on Linux.
type processCollector struct {
	cpu, rss, vsize, maxVsize, openFDs, maxFDs, start *prometheus.Desc

	startTime float64 // seconds since the epoch; 0 when it could not be read
	pageSize  float64

	mu    sync.Mutex // guards what Collect reuses
	statm [128]byte
	fds   rawfs.DirReader
}

func newProcessCollector() prometheus.Collector {
	d := func(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, nil) }
	c := &processCollector{
		cpu:      d("process_cpu_seconds_total", "CPU time the process has used, user and system, in seconds."),
		rss:      d("process_resident_memory_bytes", "Memory of the process resident in RAM, in bytes."),
		vsize:    d("process_virtual_memory_bytes", "Size of the process's virtual address space, in bytes."),
		maxVsize: d("process_virtual_memory_max_bytes", "Limit of the process's virtual address space (RLIMIT_AS), in bytes."),
		openFDs:  d("process_open_fds", "File descriptors the process has open."),
		maxFDs:   d("process_max_fds", "Limit of the process's open file descriptors (RLIMIT_NOFILE)."),
		start:    d("process_start_time_seconds", "When the process started, in seconds since the Unix epoch."),
		pageSize: float64(os.Getpagesize()),
	}
	c.startTime, _ = processStart()
	return c
}

func (c *processCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.cpu, c.rss, c.vsize, c.maxVsize, c.openFDs, c.maxFDs, c.start} {
		ch <- d
	}
}

// Collect sends what it could read. A series it could not read is left
// out, as client_golang's collector does unless told to report errors: an
// invalid metric would fail the whole scrape.
func (c *processCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) == nil {
		ch <- prometheus.MustNewConstMetric(c.cpu, prometheus.CounterValue,
			float64(ru.Utime.Nano()+ru.Stime.Nano())/float64(time.Second))
	}
	if size, resident, err := c.readStatm(); err == nil {
		ch <- prometheus.MustNewConstMetric(c.vsize, prometheus.GaugeValue, size*c.pageSize)
		ch <- prometheus.MustNewConstMetric(c.rss, prometheus.GaugeValue, resident*c.pageSize)
	}
	if n, err := c.countFDs(); err == nil {
		ch <- prometheus.MustNewConstMetric(c.openFDs, prometheus.GaugeValue, float64(n))
	}
	for _, l := range []struct {
		desc     *prometheus.Desc
		resource int
	}{{c.maxFDs, unix.RLIMIT_NOFILE}, {c.maxVsize, unix.RLIMIT_AS}} {
		var r unix.Rlimit
		if unix.Getrlimit(l.resource, &r) != nil {
			continue
		}
		// Unlimited is RLIM_INFINITY's value, as client_golang reports it.
		ch <- prometheus.MustNewConstMetric(l.desc, prometheus.GaugeValue, float64(r.Cur))
	}
	if c.startTime > 0 {
		ch <- prometheus.MustNewConstMetric(c.start, prometheus.GaugeValue, c.startTime)
	}
}

// Paths read on every scrape, NUL-terminated for the raw system calls.
var (
	statmPath = rawfs.NewPath("/proc/self/statm")
	fdPath    = rawfs.NewPath("/proc/self/fd")
)

// readStatm returns the first two fields of /proc/self/statm: the
// virtual size and the resident set, in pages.
func (c *processCollector) readStatm() (size, resident float64, err error) {
	n, err := rawfs.ReadSmall(statmPath, c.statm[:])
	if err != nil {
		return 0, 0, err
	}
	b := c.statm[:n]
	var v [2]uint64
	for i := range v {
		b = bytes.TrimLeft(b, " ")
		j := 0
		for j < len(b) && '0' <= b[j] && b[j] <= '9' {
			v[i] = v[i]*10 + uint64(b[j]-'0')
			j++
		}
		if j == 0 {
			return 0, 0, fmt.Errorf("read /proc/self/statm: %q: want two numbers first", c.statm[:n])
		}
		b = b[j:]
	}
	s, r := v[0], v[1]
	return float64(s), float64(r), nil
}

// countFDs counts the entries of /proc/self/fd, reading the directory
// into a buffer it keeps.
func (c *processCollector) countFDs() (int, error) {
	n := 0
	if err := c.fds.Each(fdPath, func([]byte) { n++ }); err != nil {
		return 0, err
	}
	// The directory's own descriptor, open while it was read, is one.
	return n - 1, nil
}

// userHZ is the unit of the times in /proc/<pid>/stat: USER_HZ, 100 on
// every Linux architecture Go supports.
const userHZ = 100

// processStart returns when the process started, in seconds since the
// epoch: its start in /proc/self/stat (field 22, in USER_HZ ticks since
// boot) plus the boot time in /proc/stat (btime). It runs once.
func processStart() (float64, error) {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/self/stat: %w", err)
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("read /proc/self/stat: no command name")
	}
	f := bytes.Fields(stat[i+1:]) // from field 3 on
	const startField = 22 - 3
	if len(f) <= startField {
		return 0, fmt.Errorf("read /proc/self/stat: %d fields after the command, want more than %d", len(f), startField)
	}
	ticks, err := strconv.ParseUint(string(f[startField]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("read /proc/self/stat: start time: %w", err)
	}
	sys, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/stat: %w", err)
	}
	for line := range bytes.Lines(sys) {
		if v, ok := bytes.CutPrefix(line, []byte("btime ")); ok {
			boot, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("read /proc/stat: btime: %w", err)
			}
			return float64(boot) + float64(ticks)/userHZ, nil
		}
	}
	return 0, fmt.Errorf("read /proc/stat: no btime")
}
