package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// limitFlags are the agent's flags for the ztunnel's accept path: what
// connections without a certificate, and any one source, may hold
// (docs/hbone.md#accept-limits).
type limitFlags struct {
	handshakeTimeout  time.Duration
	maxPending        int
	maxPendingPerIP   int
	maxPlainPerIP     int
	maxOutboundPerPod int
	fdReserve         int
	refusalLogRate    float64
}

func addLimitFlags(fs *flag.FlagSet, l *limitFlags) {
	fs.DurationVar(&l.handshakeTimeout, "hbone-handshake-timeout", hbone.DefaultTuning().HandshakeTimeout,
		"an HBONE connection must finish its TLS handshake within this time of its arrival (and send the HTTP/2 preface within as long after); also bounds the HBONE client's dial and handshake")
	fs.IntVar(&l.maxPending, "max-pending-handshakes", ztunnel.DefaultMaxPendingHandshakes,
		"HBONE connections (:15008) whose TLS handshake has not ended, from all sources together; when full, the newest pending connection of the source holding the most is shed for a source holding fewer, else the new one is refused")
	fs.IntVar(&l.maxPendingPerIP, "max-pending-handshakes-per-ip", ztunnel.DefaultMaxPendingPerIP,
		"pending HBONE handshakes of one source IP (an IPv6 /64); beyond it new connections are refused")
	fs.IntVar(&l.maxPlainPerIP, "max-inbound-plaintext-per-ip", ztunnel.DefaultMaxInboundPlaintextPerIP,
		"open inbound plaintext connections (:15006) of one source IP")
	fs.IntVar(&l.maxOutboundPerPod, "max-outbound-per-pod", 0,
		"open outbound connections (:15001) of one local pod IP (0: a quarter of the descriptor budget)")
	fs.IntVar(&l.fdReserve, "fd-reserve", 0,
		"file descriptors kept for outbound capture and established tunnels: connections without a certificate are refused once only these are left (0: a quarter of the descriptor budget)")
	fs.Float64Var(&l.refusalLogRate, "refusal-log-rate", ztunnel.DefaultRefusalLogRate,
		"log lines per second for refused handshakes and connections (bursts of 5 seconds' worth); the rest are counted and summed up every 5 s")
}

// check validates the flags; the message names the flag.
func (l *limitFlags) check() error {
	switch {
	case l.handshakeTimeout <= 0:
		return fmt.Errorf("--hbone-handshake-timeout %v: want a positive duration", l.handshakeTimeout)
	case l.maxPending <= 0:
		return fmt.Errorf("--max-pending-handshakes %d: want a positive number", l.maxPending)
	case l.maxPendingPerIP <= 0:
		return fmt.Errorf("--max-pending-handshakes-per-ip %d: want a positive number", l.maxPendingPerIP)
	case l.maxPlainPerIP <= 0:
		return fmt.Errorf("--max-inbound-plaintext-per-ip %d: want a positive number", l.maxPlainPerIP)
	case l.maxOutboundPerPod < 0:
		return fmt.Errorf("--max-outbound-per-pod %d: want 0 (a quarter of the descriptor budget) or a positive number", l.maxOutboundPerPod)
	case l.fdReserve < 0:
		return fmt.Errorf("--fd-reserve %d: want 0 (a quarter of the descriptor budget) or a positive number", l.fdReserve)
	case l.refusalLogRate <= 0:
		return fmt.Errorf("--refusal-log-rate %v: want a positive number", l.refusalLogRate)
	}
	return nil
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
func (l *limitFlags) ztunnelLimits(log *slog.Logger) (ztunnel.Limits, error) {
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
		MaxPendingHandshakes:     l.maxPending,
		MaxPendingPerIP:          l.maxPendingPerIP,
		MaxInboundPlaintextPerIP: l.maxPlainPerIP,
		MaxOutboundPerPod:        l.maxOutboundPerPod,
		Descriptors:              budget,
		DescriptorReserve:        l.fdReserve,
		RefusalLogRate:           l.refusalLogRate,
	}
	if l.fdReserve >= budget {
		return ztunnel.Limits{}, fmt.Errorf("--fd-reserve %d: the descriptor budget is only %d (open-file limit %d, %d open)", l.fdReserve, budget, limit, open)
	}
	reserve := l.fdReserve
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
