// Package enforce puts the policy engine (package policy) in the ztunnel's
// path: Authorizer implements ztunnel.Authorizer over a *policy.Engine,
// adds the rate and connection limits of MeshPolicy.spec.rateLimit,
// reports every blocking decision and AUDIT hit as a security event
// (package events), and re-decides open flows when policies or workloads
// change. It also connects the engine to the agent's cluster file
// (ManifestKinds, Policies).
package enforce

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/ztunnel"
)

// Defaults of Options.
const (
	DefaultMaxLimiters = 1 << 16
	DefaultLimiterIdle = 5 * time.Minute
)

// Options configure an Authorizer. The zero value is usable.
type Options struct {
	// TrustDomain names destination identities in events
	// (identity.DefaultTrustDomain when zero).
	TrustDomain spiffeid.TrustDomain
	// Events receives security events; nil discards them.
	Events events.Sink
	// Logger receives flows closed by re-evaluation (Info); nil discards.
	// Refused connections are logged by the ztunnel.
	Logger *slog.Logger
	// NoPreCheck makes the source ztunnel's pre-checks always pass, so
	// that only the destination decides (and only it emits events).
	NoPreCheck bool
	// MaxLimiters bounds the rate limiters kept, one per (destination
	// workload, source identity or plaintext source IP); the least
	// recently used is dropped beyond it (default DefaultMaxLimiters).
	MaxLimiters int
	// LimiterIdle drops a limiter unused for this long (default
	// DefaultLimiterIdle).
	LimiterIdle time.Duration
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Authorizer decides flows with a policy engine and enforces rate limits.
// It implements ztunnel.Authorizer and ztunnel.Releaser.
type Authorizer struct {
	eng  *policy.Engine
	opts Options
	ev   events.Sink // nil: no events
	log  *slog.Logger
	lim  *limiters
	conn conns

	auditHits, reevaluated, closed atomic.Uint64 // see Stats
}

var (
	_ ztunnel.Authorizer = (*Authorizer)(nil)
	_ ztunnel.Releaser   = (*Authorizer)(nil)
)

// New returns an Authorizer over eng.
func New(eng *policy.Engine, opts Options) *Authorizer {
	if opts.MaxLimiters <= 0 {
		opts.MaxLimiters = DefaultMaxLimiters
	}
	if opts.LimiterIdle <= 0 {
		opts.LimiterIdle = DefaultLimiterIdle
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = identity.DefaultTrustDomain
	}
	a := &Authorizer{eng: eng, opts: opts, ev: opts.Events, log: opts.Logger,
		lim: newLimiters(opts.MaxLimiters, opts.LimiterIdle), conn: conns{m: map[string]int32{}}}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	return a
}

// Engine returns the engine the Authorizer asks.
func (a *Authorizer) Engine() *policy.Engine { return a.eng }

// meshed reports whether w is a mesh workload that policy judges.
func meshed(w *workload.Workload) bool { return w != nil && w.Enrolled }

// Input turns a flow into the policy engine's question: the destination
// only if it is a mesh workload (else policy does not judge it), the
// source identity only if the source authenticated. Authorize and
// Reevaluate ask the engine with it, and so does 'mantlet policy check'.
func Input(f *ztunnel.Flow) policy.Input {
	in := policy.Input{SrcIP: f.SrcAddr.Addr(), DstPort: f.DstAddr.Port(), MTLS: f.MTLS}
	if meshed(f.Dst) {
		in.Dst = f.Dst
	}
	if f.MTLS {
		in.SrcID = f.SrcID
	}
	return in
}

// Flag maps a refusing reason to the ztunnel's response flag.
func Flag(r policy.Reason) ztunnel.ResponseFlag {
	switch r {
	case policy.ReasonDeniedByDefaultDeny:
		return ztunnel.FlagDeniedDefault
	case policy.ReasonPlaintextStrict:
		return ztunnel.FlagStrictPlaintext
	}
	return ztunnel.FlagPolicyDenied
}

// Reasons of refusals that are not the engine's, as events name them.
const (
	ReasonRateLimited    = "rate-limited"
	ReasonMaxConnections = "max-connections"
)

// Authorize decides f: the engine's verdict, then, for an admitted flow to
// a mesh workload, the source's connection rate and the workload's
// concurrent connections. Refusals and AUDIT hits become events. A
// source pre-check (f.PreCheck) asks only the engine and counts against
// no limit.
func (a *Authorizer) Authorize(_ context.Context, f *ztunnel.Flow) ztunnel.Verdict {
	if f.PreCheck && a.opts.NoPreCheck {
		return ztunnel.Verdict{Allow: true}
	}
	in := Input(f)
	d := a.eng.Decide(in)
	v := ztunnel.Verdict{Allow: d.Allowed, Policy: d.Policy, Rule: d.Rule, Reason: d.Reason.String()}
	if !d.Allowed {
		v.Flag = Flag(d.Reason)
	}
	stage := events.StageConnect
	if f.PreCheck {
		stage = events.StagePreCheck
	} else if d.AuditCount > 0 {
		a.auditHits.Add(uint64(d.AuditCount))
		for _, h := range d.AuditHits() {
			a.emit(f, nil, events.Audit, stage, v, h)
		}
	}
	if !d.Allowed {
		a.emit(f, nil, events.Deny, stage, v, policy.AuditHit{})
		return v
	}
	if f.PreCheck || in.Dst == nil {
		return v
	}
	rl, limited := a.eng.RateLimit(in.Dst)
	if limited && rl.ConnectionsPerSecond > 0 {
		k := limKey{dst: in.Dst.UID}
		if f.MTLS {
			k.id = f.SrcID.String()
		} else {
			k.ip = in.SrcIP.Unmap()
		}
		if !a.lim.allow(k, rl, a.opts.Now()) {
			v = ztunnel.Verdict{Flag: ztunnel.FlagRateLimited, Policy: rl.Policy, Rule: -1, Reason: ReasonRateLimited}
			a.emit(f, nil, events.Deny, stage, v, policy.AuditHit{})
			return v
		}
	}
	if !a.conn.acquire(in.Dst.UID, rl.MaxConnections) {
		v = ztunnel.Verdict{Flag: ztunnel.FlagMaxConnections, Policy: rl.Policy, Rule: -1, Reason: ReasonMaxConnections}
		a.emit(f, nil, events.Deny, stage, v, policy.AuditHit{})
		return v
	}
	return v
}

// Release ends the concurrent-connection count of a flow Authorize
// admitted.
func (a *Authorizer) Release(f *ztunnel.Flow, v ztunnel.Verdict) {
	if !v.Allow || f.PreCheck || !meshed(f.Dst) || (f.PreCheck && a.opts.NoPreCheck) {
		return
	}
	a.conn.release(f.Dst.UID)
}

// emit sends one security event about f, which v decided: l is the open
// flow a re-evaluation cut (nil before admission), audit the AUDIT
// policy's rule that matched (for events.Audit).
func (a *Authorizer) emit(f *ztunnel.Flow, l *ztunnel.LiveFlow, event, stage string, v ztunnel.Verdict, audit policy.AuditHit) {
	if a.ev == nil {
		return
	}
	now := a.opts.Now()
	e := events.Flow{
		Time: now, Kind: events.KindSecurityEvent, Event: event, Stage: stage,
		Direction: string(f.Direction), MTLS: f.MTLS,
		Src:          events.Endpoint{Addr: f.SrcAddr},
		Dst:          events.Endpoint{Addr: f.DstAddr},
		ResponseFlag: v.Flag.String(), Verdict: events.Allowed, Reason: v.Reason, Policy: v.Policy, Rule: v.Rule,
		AuditPolicy: audit.Policy, AuditRule: audit.Rule,
	}
	if !v.Allow {
		e.Verdict = events.Denied
	}
	if l != nil {
		e.ID, e.Path = l.ID(), string(l.Path())
		e.BytesSent, e.BytesReceived = l.Bytes()
		e.DurationMS = float64(now.Sub(l.Start()).Microseconds()) / 1000
	}
	if f.MTLS {
		e.Src.Identity = f.SrcID.String()
	}
	if f.Src != nil {
		e.Src.Workload, e.Src.Namespace = f.Src.Name, f.Src.Namespace
	}
	if f.Dst != nil {
		e.Dst.Workload, e.Dst.Namespace = f.Dst.Name, f.Dst.Namespace
		if id, err := f.Dst.ID(a.opts.TrustDomain); err == nil {
			e.Dst.Identity = id.String()
		}
	}
	a.ev.Emit(&e)
}

// FlowSource lists open flows; *ztunnel.Proxy implements it.
type FlowSource interface {
	OpenFlows(fn func(*ztunnel.LiveFlow) bool)
}

// Reevaluate re-decides every open flow of flows that this ztunnel
// admitted on its own authority (not source pre-checks, not destinations
// outside the mesh) against the engine's current policies, with the
// destination workload as snap now describes it (nil: as it was). Flows
// now refused are closed with the refusal's flag, logged and evented. Rate
// and connection limits are not re-applied to open flows. Flows are
// closed with LiveFlow.Deny, so that their records end denied, naming the
// policy and rule that refused them. It returns how many flows it closed.
func (a *Authorizer) Reevaluate(flows FlowSource, snap *workload.Snapshot) int {
	closed := 0
	flows.OpenFlows(func(l *ztunnel.LiveFlow) bool {
		f := l.Flow()
		if f.PreCheck || !meshed(f.Dst) {
			return true
		}
		if _, done := l.ClosedBy(); done {
			return true
		}
		cur := *f // with the destination as snap now describes it
		if snap != nil {
			if w := snap.WorkloadByUID(f.Dst.UID); w != nil {
				cur.Dst = w
			}
		}
		a.reevaluated.Add(1)
		d := a.eng.Decide(Input(&cur))
		if d.Allowed {
			return true
		}
		v := ztunnel.Verdict{Flag: Flag(d.Reason), Policy: d.Policy, Rule: d.Rule, Reason: d.Reason.String()}
		l.Deny(v)
		closed++
		a.closed.Add(1)
		a.emit(&cur, l, events.Deny, events.StageReevaluate, v, policy.AuditHit{})
		sent, recv := l.Bytes()
		a.log.Info("policy: open flow closed: now refused",
			"reason", d.Reason.String(), "policy", d.Policy, "rule", d.Rule, "direction", f.Direction,
			"src", f.SrcAddr, "src_id", f.SrcID, "dst", f.DstAddr, "dst_workload", cur.Dst.String(),
			"age", time.Since(l.Start()).Round(time.Millisecond), "sent", sent, "received", recv)
		return true
	})
	return closed
}

// conns counts the open connections of each destination workload; entries
// exist only while a workload has open connections admitted by Authorize,
// so the map is bounded by the ztunnel's open flows.
type conns struct {
	mu sync.Mutex
	m  map[string]int32
}

// acquire counts one more connection to uid unless max (0: unlimited) is
// reached.
func (c *conns) acquire(uid string, max int32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.m[uid]
	if max > 0 && n >= max {
		return false
	}
	c.m[uid] = n + 1
	return true
}

func (c *conns) release(uid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch n := c.m[uid]; {
	case n > 1:
		c.m[uid] = n - 1
	default:
		delete(c.m, uid)
	}
}

// Open returns the connections counted to the workload with uid.
func (a *Authorizer) Open(uid string) int {
	a.conn.mu.Lock()
	defer a.conn.mu.Unlock()
	return int(a.conn.m[uid])
}
