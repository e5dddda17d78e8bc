// Package telemetry turns what the ztunnel does into what operators read:
// Istio-compatible TCP metrics (istio_tcp_*), mantlet's own metrics
// (mantlet_*: policy decisions, certificates, the HBONE pool, build info),
// the JSON access log, and the ring buffer of recent flows that the admin
// API serves. It hangs off the ztunnel's flow hooks and never blocks them.
package telemetry

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/ztunnel"
)

// DefaultFlushInterval is how often the bytes of open flows are added to
// the byte counters.
const DefaultFlushInterval = 5 * time.Second

// ObserverOptions configure an Observer. Nil fields are left out.
type ObserverOptions struct {
	// AccessLog receives a line per closed flow (and per opened flow with
	// LogOpens).
	AccessLog *AccessLog
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
		cs = append(cs, o.opts.AccessLog)
	}
	return cs
}

// FlowOpened is called when a flow was admitted and registered
// (ztunnel.Config.OnFlowOpen).
func (o *Observer) FlowOpened(l *ztunnel.LiveFlow) {
	r := OpenRecord(l)
	o.Traffic.Opened(&r)
	if o.opts.LogOpens && o.opts.AccessLog != nil || o.opts.Flows != nil {
		ev := NewFlowEvent(&r, EventOpen, o.opts.Now().UTC())
		if o.opts.LogOpens && o.opts.AccessLog != nil {
			o.opts.AccessLog.Log(ev)
		}
		if o.opts.Flows != nil {
			o.opts.Flows.Add(ev)
		}
	}
}

// FlowEnded is called once per finished flow (ztunnel.Config.OnFlowEnd).
func (o *Observer) FlowEnded(r *ztunnel.FlowRecord) {
	o.Traffic.Closed(r)
	if v, ok := verdictOf(r); ok && !(v == VerdictAllowed && r.Direction == ztunnel.Outbound && r.Path == ztunnel.PathHBONE) {
		// An HBONE connection the source's pre-check allowed is decided
		// (and counted) again by the destination's ztunnel; counting it
		// here too would count it twice mesh-wide. A pre-check denial is
		// counted here: the destination never sees that connection.
		action := "allow"
		if v == VerdictDenied {
			action = "deny"
		}
		o.Verdicts.Decision(action, reasonOf(r), r.Verdict.Policy)
	}
	if r.Flag == ztunnel.FlagRateLimited || r.Flag == ztunnel.FlagMaxConnections {
		o.Verdicts.RateLimited(r.Flag.String(), r.Verdict.Policy)
	}
	if o.opts.AccessLog != nil || o.opts.Flows != nil {
		ev := NewFlowEvent(r, EventClose, o.opts.Now().UTC())
		if o.opts.AccessLog != nil {
			o.opts.AccessLog.Log(ev)
		}
		if o.opts.Flows != nil {
			o.opts.Flows.Add(ev)
		}
	}
}

// reasonOf names why r was allowed or denied, in the policy engine's words
// where the verdict allows telling.
func reasonOf(r *ztunnel.FlowRecord) string {
	switch {
	case r.Verdict.Reason != "":
		return r.Verdict.Reason
	case r.Verdict.Flag == ztunnel.FlagDeniedDefault:
		return "denied-by-default-deny"
	case r.Verdict.Flag == ztunnel.FlagStrictPlaintext:
		return "denied-plaintext-strict"
	case r.Verdict.Allow && r.Verdict.Policy != "":
		return "allowed-by-policy"
	case r.Verdict.Allow && r.DstWorkload == nil:
		return "allowed-not-meshed"
	case r.Verdict.Allow:
		return "allowed-by-default"
	case r.Verdict.Flag != ztunnel.FlagNone && r.Verdict.Flag != ztunnel.FlagPolicyDenied:
		return r.Verdict.Flag.String()
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
