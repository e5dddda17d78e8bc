package telemetry

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// Pool is what the HBONE metrics read; *ztunnel.Proxy implements it.
type Pool interface {
	PoolConns() int
	PoolStats() hbone.Stats
}

// PoolCollector exports the ztunnel's HBONE client pool at scrape time:
//
//	mantlet_hbone_pool_connections         pooled HBONE connections open now
//	mantlet_hbone_pool_handshakes_total    TLS handshakes made by the pool
//	mantlet_hbone_streams_total            CONNECT streams opened over the pool
type PoolCollector struct {
	pool                       Pool
	conns, handshakes, streams *prometheus.Desc
}

// NewPoolCollector returns the pool metrics over p.
func NewPoolCollector(p Pool) *PoolCollector {
	return &PoolCollector{
		pool: p,
		conns: prometheus.NewDesc("mantlet_hbone_pool_connections",
			"HBONE connections the ztunnel's client pool holds open.", nil, nil),
		handshakes: prometheus.NewDesc("mantlet_hbone_pool_handshakes_total",
			"TLS handshakes the HBONE client pool made (new connections to other nodes).", nil, nil),
		streams: prometheus.NewDesc("mantlet_hbone_streams_total",
			"HBONE CONNECT streams opened by the client pool (one per proxied connection).", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *PoolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.conns
	ch <- c.handshakes
	ch <- c.streams
}

// Collect implements prometheus.Collector.
func (c *PoolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.pool.PoolStats()
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(c.pool.PoolConns()))
	ch <- prometheus.MustNewConstMetric(c.handshakes, prometheus.CounterValue, float64(st.Handshakes))
	ch <- prometheus.MustNewConstMetric(c.streams, prometheus.CounterValue, float64(st.Streams))
}

var _ Pool = (*ztunnel.Proxy)(nil)
