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
	"strings"
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
	// Node is the node's name, recorded in events.
	Node string
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

	reasons               []atomic.Uint64 // by policy.Reason
	rateLimited, maxConns atomic.Uint64
	auditHits, precheck   atomic.Uint64
	reevaluated, closed   atomic.Uint64
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
		lim: newLimiters(opts.MaxLimiters, opts.LimiterIdle), conn: conns{m: map[string]int32{}},
		reasons: make([]atomic.Uint64, len(policy.Reasons()))}
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
	a.reasons[d.Reason].Add(1)
	stage := events.StageConnect
	if f.PreCheck {
		a.precheck.Add(1)
		stage = events.StagePreCheck
	} else if d.AuditCount > 0 {
		a.auditHits.Add(uint64(d.AuditCount))
		flag := "-"
		if !d.Allowed {
			flag = Flag(d.Reason).String()
		}
		for _, h := range d.AuditHits() {
			a.emit(f, events.Audit, stage, d.Reason.String(), flag, h.Policy, h.Rule)
		}
	}
	if !d.Allowed {
		flag := Flag(d.Reason)
		a.emit(f, events.Deny, stage, d.Reason.String(), flag.String(), d.Policy, d.Rule)
		return ztunnel.Verdict{Flag: flag, Policy: d.Policy, Rule: d.Rule, Reason: d.Reason.String()}
	}
	v := ztunnel.Verdict{Allow: true, Policy: d.Policy, Rule: d.Rule, Reason: d.Reason.String()}
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
			a.rateLimited.Add(1)
			a.emit(f, events.Deny, stage, ReasonRateLimited, ztunnel.FlagRateLimited.String(), rl.Policy, -1)
			return ztunnel.Verdict{Flag: ztunnel.FlagRateLimited, Policy: rl.Policy, Rule: -1, Reason: ReasonRateLimited}
		}
	}
	if !a.conn.acquire(in.Dst.UID, rl.MaxConnections) {
		a.maxConns.Add(1)
		a.emit(f, events.Deny, stage, ReasonMaxConnections, ztunnel.FlagMaxConnections.String(), rl.Policy, -1)
		return ztunnel.Verdict{Flag: ztunnel.FlagMaxConnections, Policy: rl.Policy, Rule: -1, Reason: ReasonMaxConnections}
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

// emit sends one event about f.
func (a *Authorizer) emit(f *ztunnel.Flow, verdict events.Verdict, stage events.Stage, reason, flag, pol string, rule int) {
	if a.ev == nil {
		return
	}
	e := events.Event{
		Time: a.opts.Now(), Verdict: verdict, Stage: stage, Reason: reason, Flag: flag, Rule: rule,
		Node: a.opts.Node, Direction: string(f.Direction), MTLS: f.MTLS, Src: f.SrcAddr, Dst: f.DstAddr,
	}
	e.PolicyNamespace, e.PolicyName, _ = strings.Cut(pol, "/")
	if f.MTLS {
		e.SrcID = f.SrcID.String()
	}
	if f.Src != nil {
		e.SrcWorkload, e.SrcNamespace = f.Src.Name, f.Src.Namespace
	}
	if f.Dst != nil {
		e.DstWorkload, e.DstNamespace = f.Dst.Name, f.Dst.Namespace
		if id, err := f.Dst.ID(a.opts.TrustDomain); err == nil {
			e.DstID = id.String()
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
		flag := Flag(d.Reason)
		l.Deny(ztunnel.Verdict{Flag: flag, Policy: d.Policy, Rule: d.Rule, Reason: d.Reason.String()})
		closed++
		a.closed.Add(1)
		a.emit(&cur, events.Deny, events.StageReevaluate, d.Reason.String(), flag.String(), d.Policy, d.Rule)
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
