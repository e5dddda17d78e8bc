package node

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// LimitsConfig bounds the ztunnel's accept path: what connections
// without a certificate, and any one source, may hold
// (docs/hbone.md#accept-limits). The zero value takes defaults.
type LimitsConfig struct {
	// HandshakeTimeout: an HBONE connection must finish its TLS handshake
	// within this time of its arrival.
	HandshakeTimeout time.Duration
	// MaxPending and MaxPendingPerIP bound pending HBONE handshakes, all
	// together and per source IP (an IPv6 /64).
	MaxPending, MaxPendingPerIP int
	// MaxPlainPerIP bounds open inbound plaintext connections per source.
	MaxPlainPerIP int
	// MaxOutboundPerPod bounds open outbound connections per local pod (0:
	// a quarter of the descriptor budget).
	MaxOutboundPerPod int
	// FDReserve keeps descriptors for outbound capture and established
	// tunnels (0: a quarter of the descriptor budget).
	FDReserve int
	// StreamsPerConn and ConnsPerKey bound the HBONE client's pool:
	// streams per pooled connection and connections per key (0: the
	// defaults of hbone.Tuning).
	StreamsPerConn, ConnsPerKey int
	// SpreadConnsPerKey is how many connections of a key new streams
	// spread over (hbone.Tuning.SpreadConnsPerKey); 0: GOMAXPROCS.
	SpreadConnsPerKey int
	// KeyExchange is the set of TLS 1.3 key exchange groups of HBONE, as
	// client and server (nil: hbone.DefaultKeyExchange).
	KeyExchange hbone.KeyExchange
	// RefusalLogRate is the most refusal log lines per second.
	RefusalLogRate float64
}

// agentDescriptors is what the agent keeps for descriptors it opens after
// the ztunnel starts, outside the ztunnel's accounting: metrics scrapes,
// readiness probes, admin API clients (up to 32 followers), the cluster
// file's watcher, netlink sockets.
const agentDescriptors = 128

// minDescriptorBudget is the smallest budget the agent starts with.
const minDescriptorBudget = 64

// ztunnelLimits raises the open-file limit as far as it goes and returns
// the ztunnel's limits, with a descriptor budget of the limit minus the
// descriptors open now minus agentDescriptors. Call it when everything
// the agent opens at start is open (data path, listeners).
func (l *LimitsConfig) ztunnelLimits(log *slog.Logger) (ztunnel.Limits, error) {
	limit, hard, err := raiseFileLimit()
	if err != nil {
		return ztunnel.Limits{}, err
	}
	open, err := openDescriptors()
	if err != nil {
		return ztunnel.Limits{}, err
	}
	budget := limit - open - agentDescriptors
	if budget < minDescriptorBudget {
		return ztunnel.Limits{}, fmt.Errorf("open-file limit %d (hard %d) leaves %d descriptors for connections, %d already open: raise it (ulimit -n, LimitNOFILE=)",
			limit, hard, budget, open)
	}
	lim := ztunnel.Limits{
		MaxPendingHandshakes:     l.MaxPending,
		MaxPendingPerIP:          l.MaxPendingPerIP,
		MaxInboundPlaintextPerIP: l.MaxPlainPerIP,
		MaxOutboundPerPod:        l.MaxOutboundPerPod,
		Descriptors:              budget,
		DescriptorReserve:        l.FDReserve,
		RefusalLogRate:           l.RefusalLogRate,
	}
	if l.FDReserve >= budget {
		return ztunnel.Limits{}, fmt.Errorf("descriptor reserve %d: the descriptor budget is only %d (open-file limit %d, %d open)", l.FDReserve, budget, limit, open)
	}
	reserve := l.FDReserve
	if reserve == 0 {
		reserve = budget / 4
	}
	level := slog.LevelInfo
	if budget < 1024 {
		level = slog.LevelWarn
	}
	log.Log(context.Background(), level, "descriptor budget of the ztunnel's connections", "open_file_limit", limit, "hard_limit", hard,
		"open_at_start", open, "kept_for_the_agent", agentDescriptors, "budget", budget, "reserve", reserve)
	return lim, nil
}

// admissionCollector exports the ztunnel's accept path.
type admissionCollector struct {
	stats                  func() ztunnel.AdmissionStats
	pending, sources       *prometheus.Desc
	inUse, budget, reserve *prometheus.Desc
	plain, outbound        *prometheus.Desc
}

func newAdmissionCollector(stats func() ztunnel.AdmissionStats) *admissionCollector {
	return &admissionCollector{
		stats: stats,
		pending: prometheus.NewDesc("mantlet_ztunnel_pending_handshakes",
			"HBONE connections accepted whose TLS handshake has not ended.", nil, nil),
		sources: prometheus.NewDesc("mantlet_ztunnel_pending_handshake_sources",
			"Source IPs (IPv6: /64s) of the pending HBONE handshakes.", nil, nil),
		plain: prometheus.NewDesc("mantlet_ztunnel_inbound_plaintext_connections",
			"Open inbound plaintext connections (:15006).", nil, nil),
		outbound: prometheus.NewDesc("mantlet_ztunnel_outbound_connections",
			"Open outbound connections (:15001).", nil, nil),
		inUse: prometheus.NewDesc("mantlet_ztunnel_descriptors_in_use",
			"File descriptors the ztunnel's connections use, estimated from above.", nil, nil),
		budget: prometheus.NewDesc("mantlet_ztunnel_descriptors_budget",
			"File descriptors the ztunnel's connections may use: the open-file limit minus what the agent keeps.", nil, nil),
		reserve: prometheus.NewDesc("mantlet_ztunnel_descriptors_reserved",
			"Of the budget, the descriptors only outbound capture and established tunnels may use.", nil, nil),
	}
}

func (c *admissionCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.pending, c.sources, c.plain, c.outbound, c.inUse, c.budget, c.reserve} {
		ch <- d
	}
}

func (c *admissionCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for _, m := range []struct {
		d *prometheus.Desc
		v int
	}{
		{c.pending, s.PendingHandshakes}, {c.sources, s.PendingSources}, {c.plain, s.InboundPlaintext}, {c.outbound, s.Outbound},
		{c.inUse, s.Descriptors}, {c.budget, s.DescriptorBudget}, {c.reserve, s.DescriptorReserve},
	} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.GaugeValue, float64(m.v))
	}
}
