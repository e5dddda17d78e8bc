package enforce

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Stats counts what an Authorizer did beyond the verdicts (which the
// telemetry counts, by reason and response flag, when flows end).
type Stats struct {
	// AuditHits counts AUDIT policies that matched admitted or refused
	// connections.
	AuditHits uint64
	// Reevaluated counts open flows decided again after a change; Closed
	// those of them that were closed.
	Reevaluated, Closed uint64
	// Buckets is how many rate-limit buckets are held; Evicted how many
	// were dropped (idle, or the least recently used beyond the cap).
	Buckets int
	Evicted uint64
}

// Stats returns the counts so far.
func (a *Authorizer) Stats() Stats {
	a.lim.mu.Lock()
	buckets, evicted := len(a.lim.m), a.lim.evicted
	a.lim.mu.Unlock()
	return Stats{
		AuditHits: a.auditHits.Load(), Reevaluated: a.reevaluated.Load(), Closed: a.closed.Load(),
		Buckets: buckets, Evicted: evicted,
	}
}

// Collector exports an Authorizer's Stats:
//
//	mantlet_policy_audit_hits_total
//	mantlet_policy_reevaluated_flows_total{result="kept"|"closed"}
//	mantlet_policy_ratelimit_buckets
//	mantlet_policy_ratelimit_buckets_evicted_total
type Collector struct {
	a       *Authorizer
	audit   *prometheus.Desc
	reeval  *prometheus.Desc
	buckets *prometheus.Desc
	evicted *prometheus.Desc
}

// NewCollector returns a Collector of a.
func NewCollector(a *Authorizer) *Collector {
	return &Collector{
		a: a,
		audit: prometheus.NewDesc("mantlet_policy_audit_hits_total",
			"AUDIT policies that matched a connection (what a DENY written like them would have refused).", nil, nil),
		reeval: prometheus.NewDesc("mantlet_policy_reevaluated_flows_total",
			"Open connections decided again after a policy or workload change, by result (kept, closed).", []string{"result"}, nil),
		buckets: prometheus.NewDesc("mantlet_policy_ratelimit_buckets",
			"Rate-limit token buckets held (one per destination workload and source identity or plaintext source IP).", nil, nil),
		evicted: prometheus.NewDesc("mantlet_policy_ratelimit_buckets_evicted_total",
			"Rate-limit buckets dropped because they were idle or the least recently used beyond the cap.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.audit
	ch <- c.reeval
	ch <- c.buckets
	ch <- c.evicted
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Stats()
	ch <- prometheus.MustNewConstMetric(c.audit, prometheus.CounterValue, float64(s.AuditHits))
	ch <- prometheus.MustNewConstMetric(c.reeval, prometheus.CounterValue, float64(s.Reevaluated-s.Closed), "kept")
	ch <- prometheus.MustNewConstMetric(c.reeval, prometheus.CounterValue, float64(s.Closed), "closed")
	ch <- prometheus.MustNewConstMetric(c.buckets, prometheus.GaugeValue, float64(s.Buckets))
	ch <- prometheus.MustNewConstMetric(c.evicted, prometheus.CounterValue, float64(s.Evicted))
}
