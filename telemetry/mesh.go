package telemetry

import (
	"runtime"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// Verdicts counts policy decisions on flows, under
// mantlet_policy_decisions_total{action, reason, policy}: action is allow
// or deny, reason the decision's reason, policy the deciding policy as
// namespace/name ("" for defaults). Series are bounded by the policies in
// force times the reasons.
type Verdicts struct {
	decisions *prometheus.CounterVec
	rateDrops *prometheus.CounterVec
}

// NewVerdicts returns the policy metrics, not registered.
func NewVerdicts() *Verdicts {
	return &Verdicts{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_policy_decisions_total",
			Help: "Policy decisions on connections, each counted once mesh-wide (allowed HBONE connections by the destination's node, denials where they happened; a connection cut by a policy change counts its allow and the deny), by action (allow, deny), reason and deciding policy (namespace/name; empty for defaults).",
		}, []string{"action", "reason", "policy"}),
		rateDrops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_ratelimit_dropped_connections_total",
			Help: "Connections refused by a policy's rateLimit, by limit (rate_limited: new connections per second of one source; max_connections: concurrent connections to the workload) and policy.",
		}, []string{"limit", "policy"}),
	}
}

// Describe implements prometheus.Collector.
func (v *Verdicts) Describe(ch chan<- *prometheus.Desc) {
	v.decisions.Describe(ch)
	v.rateDrops.Describe(ch)
}

// Collect implements prometheus.Collector.
func (v *Verdicts) Collect(ch chan<- prometheus.Metric) {
	v.decisions.Collect(ch)
	v.rateDrops.Collect(ch)
}

// Decision counts one decision.
func (v *Verdicts) Decision(action, reason, policy string) {
	v.decisions.WithLabelValues(action, reason, policy).Inc()
}

// RateLimited counts a connection refused by a limit (the response flag
// rate_limited or max_connections) of policy.
func (v *Verdicts) RateLimited(limit, policy string) {
	v.rateDrops.WithLabelValues(limit, policy).Inc()
}

// Certificates exports the node's SVIDs, read from the identity manager at
// scrape time, and counts issuance attempts (hook it to
// identity.ManagerOptions.OnIssue):
//
//	mantlet_svid_expiry_seconds{identity}    seconds until the SVID expires (negative: expired)
//	mantlet_svid_issuances_total{result}     attempts to get an SVID: ok or failed
//
// One series per identity of the node's workloads.
type Certificates struct {
	certs  func() []identity.CertInfo
	now    func() time.Time
	expiry *prometheus.Desc
	issued *prometheus.CounterVec
}

// NewCertificates returns the certificate metrics over certs (for example
// (*identity.Manager).Certificates); now may be nil (time.Now).
func NewCertificates(certs func() []identity.CertInfo, now func() time.Time) *Certificates {
	if now == nil {
		now = time.Now
	}
	c := &Certificates{
		certs: certs, now: now,
		expiry: prometheus.NewDesc("mantlet_svid_expiry_seconds",
			"Seconds until the node's SVID of this identity expires; negative once expired.", []string{"identity"}, nil),
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_svid_issuances_total",
			Help: "Attempts to get an SVID from the CA (first fetches and renewals), by result: ok or failed.",
		}, []string{"result"}),
	}
	c.issued.WithLabelValues("ok")
	c.issued.WithLabelValues("failed")
	return c
}

// OnIssue counts one issuance attempt; it matches
// identity.ManagerOptions.OnIssue.
func (c *Certificates) OnIssue(_ spiffeid.ID, err error) {
	if err != nil {
		c.issued.WithLabelValues("failed").Inc()
		return
	}
	c.issued.WithLabelValues("ok").Inc()
}

// Describe implements prometheus.Collector.
func (c *Certificates) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.expiry
	c.issued.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Certificates) Collect(ch chan<- prometheus.Metric) {
	now := c.now()
	for _, ci := range c.certs() {
		if ci.NotAfter.IsZero() {
			continue // no SVID yet: nothing expires
		}
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, ci.NotAfter.Sub(now).Seconds(), ci.ID.String())
	}
	c.issued.Collect(ch)
}

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

// BuildInfo returns mantlet_build_info{version, goversion} = 1.
func BuildInfo() prometheus.Collector {
	v := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		v = bi.Main.Version
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "mantlet_build_info",
		Help:        "Always 1; the labels name the build.",
		ConstLabels: prometheus.Labels{"version": v, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}
