package telemetry

import (
	"github.com/prometheus/client_golang/prometheus"
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
