// Package telemetry turns what the ztunnel does into what operators read:
// Istio-compatible TCP metrics (istio_tcp_*), mantlet's own metrics
// (mantlet_*: policy decisions, certificates, the HBONE pool, build info),
// the access log (lines of package events), and the ring buffer of recent
// flows that the admin API serves. It hangs off the ztunnel's flow hooks
// and never blocks them.
package telemetry

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
)

// DefaultFlushInterval is how often the bytes of open flows are added to
// the byte counters.
const DefaultFlushInterval = 5 * time.Second

// ObserverOptions configure an Observer. Nil fields are left out.
type ObserverOptions struct {
	// AccessLog receives a line per closed flow (and per opened flow with
	// LogOpens).
	AccessLog *events.Writer
	LogOpens  bool
	// Flows keeps recent flow events for the admin API.
	Flows *FlowLog
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Observer is the ztunnel's flow hooks' single subscriber: it feeds the
// traffic and policy metrics, the access log and the flow ring. Its
// methods are quick and never block.
type Observer struct {
	Traffic  *Traffic
	Verdicts *Verdicts
	opts     ObserverOptions
}

// NewObserver returns an observer with fresh metrics.
func NewObserver(opts ObserverOptions) *Observer {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Observer{Traffic: NewTraffic(), Verdicts: NewVerdicts(), opts: opts}
}

// Collectors returns the observer's metrics to register.
func (o *Observer) Collectors() []prometheus.Collector {
	cs := []prometheus.Collector{o.Traffic, o.Verdicts}
	if o.opts.AccessLog != nil {
		cs = append(cs, events.NewCollector(o.opts.AccessLog, "mantlet_accesslog_lines_total",
			"Access log lines, by result: written, suppressed (rate_limited, queue_full) or lost to a failed write (failed)."))
	}
	return cs
}

// FlowOpened is called when a flow was admitted and registered
// (ztunnel.Config.OnFlowOpen).
func (o *Observer) FlowOpened(l *ztunnel.LiveFlow) {
	r := OpenRecord(l)
	o.opened(&r)
}

// opened is FlowOpened of the flow r describes.
func (o *Observer) opened(r *ztunnel.FlowRecord) {
	s := o.Traffic.opens(r)
	if o.opts.LogOpens && o.opts.AccessLog != nil || o.opts.Flows != nil {
		f := newFlow(r, events.Open, o.opts.Now().UTC(), s.serviceHostOf(r))
		if o.opts.LogOpens && o.opts.AccessLog != nil {
			o.opts.AccessLog.Emit(&f)
		}
		if o.opts.Flows != nil {
			o.opts.Flows.Add(f)
		}
	}
}

// FlowEnded is called once per finished flow (ztunnel.Config.OnFlowEnd).
func (o *Observer) FlowEnded(r *ztunnel.FlowRecord) {
	s := o.Traffic.closes(r)
	o.countDecisions(r)
	if r.Flag == ztunnel.FlagRateLimited || r.Flag == ztunnel.FlagMaxConnections {
		o.Verdicts.RateLimited(r.Flag.String(), r.Verdict.Policy)
	}
	if o.opts.AccessLog != nil || o.opts.Flows != nil {
		f := newFlow(r, events.Close, o.opts.Now().UTC(), s.serviceHostOf(r))
		if o.opts.AccessLog != nil {
			o.opts.AccessLog.Emit(&f)
		}
		if o.opts.Flows != nil {
			o.opts.Flows.Add(f)
		}
	}
}

// countDecisions counts the policy decisions r carries in
// mantlet_policy_decisions_total, each once mesh-wide. An HBONE
// connection is decided (and counted) by the destination's ztunnel, so
// the source counts only its pre-check's denials, which the destination
// never sees: neither what its pre-check allowed nor what the destination
// then refused with 401. A flow admitted here and later cut by a
// re-evaluation (r.Admitted) counts both decisions, the allow and the
// deny.
func (o *Observer) countDecisions(r *ztunnel.FlowRecord) {
	hboneSource := r.Direction == ztunnel.Outbound && r.Path == ztunnel.PathHBONE
	if r.Admitted.Allow && !hboneSource {
		o.Verdicts.Decision("allow", reasonOfVerdict(r.Admitted, r.DstWorkload), r.Admitted.Policy)
	}
	v, ok := verdictOf(r)
	switch {
	case !ok:
	case hboneSource && (v == events.Allowed || r.Verdict.Flag == ztunnel.FlagHBONERefused):
	case v == events.Denied:
		o.Verdicts.Decision("deny", reasonOf(r), r.Verdict.Policy)
	default:
		o.Verdicts.Decision("allow", reasonOf(r), r.Verdict.Policy)
	}
}

// reasonOf names why r was allowed or denied, in the policy engine's words
// where the verdict allows telling.
func reasonOf(r *ztunnel.FlowRecord) string { return reasonOfVerdict(r.Verdict, r.DstWorkload) }

// reasonOfVerdict names why v allowed or denied a flow to dst.
func reasonOfVerdict(v ztunnel.Verdict, dst *workload.Workload) string {
	switch {
	case v.Reason != "":
		return v.Reason
	case v.Flag == ztunnel.FlagDeniedDefault:
		return "denied-by-default-deny"
	case v.Flag == ztunnel.FlagStrictPlaintext:
		return "denied-plaintext-strict"
	case v.Allow && v.Policy != "":
		return "allowed-by-policy"
	case v.Allow && dst == nil:
		return "allowed-not-meshed"
	case v.Allow:
		return "allowed-by-default"
	case v.Flag != ztunnel.FlagNone && v.Flag != ztunnel.FlagPolicyDenied:
		return v.Flag.String()
	default:
		return "denied"
	}
}

// OpenFlows lists the ztunnel's open flows; *ztunnel.Proxy implements it.
type OpenFlows interface {
	OpenFlows(fn func(*ztunnel.LiveFlow) bool)
}

// Flush adds the bytes the open flows carried since the last flush.
func (o *Observer) Flush(src OpenFlows) {
	src.OpenFlows(func(l *ztunnel.LiveFlow) bool {
		up, down := l.Bytes()
		o.Traffic.Flush(l.ID(), up, down)
		return true
	})
}

// RunFlush flushes src every interval (DefaultFlushInterval if ≤ 0) until
// ctx is done.
func (o *Observer) RunFlush(ctx context.Context, interval time.Duration, src OpenFlows) error {
	if interval <= 0 {
		interval = DefaultFlushInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			o.Flush(src)
		}
	}
}

var _ OpenFlows = (*ztunnel.Proxy)(nil)
