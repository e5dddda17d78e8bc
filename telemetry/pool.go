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
	ServerKeyExchanges() map[string]uint64
}

// PoolCollector exports the ztunnel's HBONE client pool at scrape time:
//
//	mantlet_hbone_pool_connections         pooled HBONE connections open now
//	mantlet_hbone_pool_handshakes_total    TLS handshakes made by the pool
//	mantlet_hbone_streams_total            CONNECT streams opened over the pool
//	mantlet_hbone_key_exchanges_total      HBONE handshakes by side and key exchange group
type PoolCollector struct {
	pool                            Pool
	conns, handshakes, streams, kex *prometheus.Desc
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
		kex: prometheus.NewDesc("mantlet_hbone_key_exchanges_total",
			"HBONE TLS handshakes completed, by side (client: the pool dialled; server: :15008 accepted) and the key exchange group agreed on (X25519MLKEM768 is post-quantum hybrid).",
			[]string{"side", "key_exchange"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *PoolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.conns
	ch <- c.handshakes
	ch <- c.streams
	ch <- c.kex
}

// Collect implements prometheus.Collector.
func (c *PoolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.pool.PoolStats()
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(c.pool.PoolConns()))
	ch <- prometheus.MustNewConstMetric(c.handshakes, prometheus.CounterValue, float64(st.Handshakes))
	ch <- prometheus.MustNewConstMetric(c.streams, prometheus.CounterValue, float64(st.Streams))
	for side, counts := range map[string]map[string]uint64{"client": st.KeyExchanges, "server": c.pool.ServerKeyExchanges()} {
		for group, n := range counts {
			ch <- prometheus.MustNewConstMetric(c.kex, prometheus.CounterValue, float64(n), side, group)
		}
	}
}

var _ Pool = (*ztunnel.Proxy)(nil)
