package telemetry

import (
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TestMetricsHandlerDoesNotCompress: a scraper that accepts gzip, as
// Prometheus does, gets the text format uncompressed.
func TestMetricsHandlerDoesNotCompress(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector())
	req := httptest.NewRequest("GET", "/metrics", nil)
	req.Header.Set("Accept-Encoding", "gzip, deflate")
	w := httptest.NewRecorder()
	MetricsHandler(reg).ServeHTTP(w, req)
	if enc := w.Result().Header.Get("Content-Encoding"); enc != "" {
		t.Errorf("Content-Encoding %q, want none", enc)
	}
	b, _ := io.ReadAll(w.Result().Body)
	if !strings.Contains(string(b), "\ngo_goroutines ") {
		t.Errorf("no go_goroutines in the exposition:\n%.500s", b)
	}
}

// BenchmarkMetricsScrape measures a scrape of the Go and process
// collectors (the agent's: NewProcessCollector) by a scraper that accepts gzip, after a collection (as
// between an idle agent's scrapes): by MetricsHandler, and by promhttp's
// default handler, which compresses.
func BenchmarkMetricsScrape(b *testing.B) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), NewProcessCollector())
	for _, c := range []struct {
		name string
		h    http.Handler
	}{
		{"uncompressed", MetricsHandler(reg)},
		{"gzip", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				b.StopTimer()
				runtime.GC()
				runtime.GC()
				b.StartTimer()
				req := httptest.NewRequest("GET", "/metrics", nil)
				req.Header.Set("Accept-Encoding", "gzip")
				c.h.ServeHTTP(httptest.NewRecorder(), req)
			}
		})
	}
}
