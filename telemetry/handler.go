package telemetry

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MetricsHandler serves reg's metrics in Prometheus' text format, never
// compressed, even to a scraper that accepts gzip. An agent's exposition
// is small (about 18 KB with a few workloads), while a gzip writer is
// about 0.8 MB of allocation whenever promhttp's pool of them was emptied
// by a collection, which between an idle agent's scrapes it always is:
// garbage that an idle agent, whose heap is a few MB, would otherwise
// hold until its next collection (BenchmarkMetricsScrape).
func MetricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, DisableCompression: true})
}
