package ztunnel

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mantlet/mantlet/internal/shrink"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultMaxFlows is the default of Config.MaxFlows.
const DefaultMaxFlows = 1 << 16

// Open-flow registry
//
// Every flow that passed authorization is registered, from just before the
// ztunnel connects to the destination until the flow ends (right before
// OnFlowEnd is called). The registry is a sharded map keyed by a flow id
// that never repeats within a Proxy; it holds at most Config.MaxFlows
// flows, and a connection that would exceed it is refused with
// FlagFlowLimit, so the registry bounds the ztunnel's open connections.
//
// A registered flow is a *LiveFlow. Its descriptive fields never change;
// its byte counters are atomic and move as the splice copies each buffer
// (at most hbone.BufSize bytes behind the sockets), so a reader that polls
// Bytes sees a flow's progress while it is open. OnFlowEnd's FlowRecord
// carries the final counts. Close tears a flow down from any goroutine (an
// operator, shutdown): both of its connections are reset (RST, and
// RST_STREAM on a tunnel) within the time it takes the flow's goroutine
// to notice, so neither application takes it for an end of data, and
// its FlowRecord ends with the flag given to Close. Deny does the same for
// a flow the Authorizer now refuses (policy re-evaluation), and its
// FlowRecord says so: the refusal is its Verdict, the admission its
// Admitted.
//
// Authorizers that keep per-flow state (concurrent-connection limits) can
// implement Releaser: Release is called once for every flow they allowed,
// when it ends.

// Releaser is implemented by Authorizers that must know when a flow they
// allowed ends. Release is called exactly once per allowed flow, after
// its connections are closed and before it leaves the registry (once
// NumOpenFlows no longer counts a flow, its Release has returned), with
// the same Flow and the Verdict Authorize returned.
type Releaser interface {
	Release(f *Flow, v Verdict)
}

// LiveFlow is an open flow in the registry (see OpenFlows). Its methods
// are safe for concurrent use.
type LiveFlow struct {
	id      uint64
	dir     Direction
	path    Path
	start   time.Time
	flow    Flow
	origDst netip.AddrPort
	dstID   spiffeid.ID
	svc     *workload.Service
	verdict Verdict

	sent, received atomic.Int64
	// ending is set by the first Close or Deny; nil while open.
	ending atomic.Pointer[ending]
	ctx    *flowctx.Ctx // the flow's; Close, Deny and untrack end it
}

// ending is why a flow was torn down.
type ending struct {
	flag   ResponseFlag
	denied *Verdict // Deny's refusal, nil for Close
}

// ID identifies the flow; ids are not reused by a Proxy.
func (l *LiveFlow) ID() uint64 { return l.id }

// Direction of the flow, as seen by this ztunnel.
func (l *LiveFlow) Direction() Direction { return l.dir }

// Path says how the flow is carried.
func (l *LiveFlow) Path() Path { return l.path }

// Start is when the connection arrived.
func (l *LiveFlow) Start() time.Time { return l.start }

// Flow is what the Authorizer was asked about: identities, workloads and
// addresses. The caller must not modify it.
func (l *LiveFlow) Flow() *Flow { return &l.flow }

// OrigDst is the address the client dialled (a service VIP, or
// Flow().DstAddr).
func (l *LiveFlow) OrigDst() netip.AddrPort { return l.origDst }

// DstID is the destination workload's identity (zero when not meshed).
func (l *LiveFlow) DstID() spiffeid.ID { return l.dstID }

// Service is the service the client dialled, nil when it dialled a pod.
func (l *LiveFlow) Service() *workload.Service { return l.svc }

// Verdict is the Authorizer's answer that admitted the flow.
func (l *LiveFlow) Verdict() Verdict { return l.verdict }

// Bytes returns the bytes moved so far from client to destination (sent)
// and back (received).
func (l *LiveFlow) Bytes() (sent, received int64) {
	return l.sent.Load(), l.received.Load()
}

// Close tears the flow down: both connections are reset and the flow's
// FlowRecord ends with reason as its Flag (FlagNone is recorded as
// FlagClosed). Only the first Close counts; closing a flow that already
// ended does nothing.
func (l *LiveFlow) Close(reason ResponseFlag) {
	if reason == FlagNone {
		reason = FlagClosed
	}
	if l.ending.CompareAndSwap(nil, &ending{flag: reason}) {
		l.ctx.Cancel(nil)
	}
}

// Deny tears the flow down because the Authorizer, asked again, now
// refuses it (v is its answer; v.Flag FlagNone stands for
// FlagPolicyDenied): as Close(v.Flag) does, and the flow's FlowRecord
// reports v as its Verdict and the verdict that admitted the flow as
// Admitted, so that it reads as denied, by v's policy and rule. Only the
// first Close or Deny counts.
func (l *LiveFlow) Deny(v Verdict) {
	v.Allow = false
	if v.Flag == FlagNone {
		v.Flag = FlagPolicyDenied
	}
	if l.ending.CompareAndSwap(nil, &ending{flag: v.Flag, denied: &v}) {
		l.ctx.Cancel(nil)
	}
}

// ClosedBy returns the flag given to Close (or Deny's), and false while
// neither was called.
func (l *LiveFlow) ClosedBy() (ResponseFlag, bool) {
	e := l.ending.Load()
	if e == nil {
		return FlagNone, false
	}
	return e.flag, true
}

const flowShards = 32

// flowTable is the registry: flowShards maps, each behind its own lock,
// and one atomic count against the cap.
type flowTable struct {
	next   atomic.Uint64
	n      atomic.Int64
	max    int64
	shards [flowShards]struct {
		mu   sync.Mutex
		m    map[uint64]*LiveFlow
		peak shrink.Peak // the most flows m held, so that it gives them back
		_    [32]byte    // keep shards on separate cache lines
	}
}

// shrinkFrom is the peak of a shard from which its map is made anew once
// it holds a quarter of that: a Go map keeps the memory of the most it
// held (10,000 flows leave about 0.5 MB of empty tables behind), and a
// shard holds a 32nd of the flows.
const shrinkFrom = 64

func newFlowTable(max int) *flowTable {
	t := &flowTable{max: int64(max)}
	for i := range t.shards {
		t.shards[i].m = make(map[uint64]*LiveFlow)
		t.shards[i].peak.Min = shrinkFrom
	}
	return t
}

// add registers l and gives it an id; false when the table is full.
func (t *flowTable) add(l *LiveFlow) bool {
	if t.n.Add(1) > t.max {
		t.n.Add(-1)
		return false
	}
	l.id = t.next.Add(1)
	s := &t.shards[l.id%flowShards]
	s.mu.Lock()
	s.m[l.id] = l
	s.mu.Unlock()
	return true
}

func (t *flowTable) remove(l *LiveFlow) {
	s := &t.shards[l.id%flowShards]
	s.mu.Lock()
	shrink.Delete(&s.m, l.id, &s.peak)
	s.mu.Unlock()
	t.n.Add(-1)
}

// each calls fn for every registered flow, shard by shard, outside the
// shard's lock, until fn returns false.
func (t *flowTable) each(fn func(*LiveFlow) bool) {
	var batch []*LiveFlow
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		batch = batch[:0]
		for _, l := range s.m {
			batch = append(batch, l)
		}
		s.mu.Unlock()
		for _, l := range batch {
			if !fn(l) {
				return
			}
		}
	}
}

// OpenFlows calls fn for every open flow until fn returns false. Flows
// that open or end meanwhile may or may not be seen; fn may call Close. It
// is meant for periodic readers (flow tables, byte counters of long flows)
// and policy re-evaluation, not for per-packet work: it takes each shard's
// lock briefly.
func (p *Proxy) OpenFlows(fn func(*LiveFlow) bool) { p.live.each(fn) }

// NumOpenFlows returns how many flows are registered.
func (p *Proxy) NumOpenFlows() int { return int(p.live.n.Load()) }

// track registers the flow rec describes, which f's authorization
// admitted, and returns it with the context that governs it; on false the
// registry is full, rec says so and the flow must end. The caller must
// defer untrack when track succeeds.
func (p *Proxy) track(ctx context.Context, rec *FlowRecord, f *Flow) (*LiveFlow, context.Context, bool) {
	l := &LiveFlow{
		dir: rec.Direction, path: rec.Path, start: rec.Start, flow: *f,
		origDst: rec.OrigDst, dstID: rec.DstID, svc: rec.Service, verdict: rec.Verdict,
	}
	if ctx == p.ctx {
		// A flow of the proxy's own listeners ends with the proxy through
		// the registry (Close), not as a child of p.ctx: a context keeps
		// a map of its children, and a Go map keeps the memory of the
		// most it held (0.4 MB after 10,000 flows).
		l.ctx = flowctx.Owned(ctx)
	} else {
		// An HBONE stream's flow ends with its stream. Its context is a
		// flowctx.Ctx, which links the flow's into itself.
		l.ctx = flowctx.New(ctx)
	}
	if !p.live.add(l) {
		l.ctx.Cancel(nil)
		p.release(f, rec.Verdict)
		rec.Flag, rec.Err = FlagFlowLimit, fmt.Errorf("ztunnel: %d flows open, the limit", p.live.max)
		return nil, ctx, false
	}
	if p.ctx.Err() != nil {
		l.ctx.Cancel(nil) // Close ran before the flow was in the registry
	}
	rec.ID = l.id
	if p.cfg.OnFlowOpen != nil {
		p.cfg.OnFlowOpen(l)
	}
	return l, l.ctx, true
}

// untrack releases l to the Authorizer, removes it from the registry and,
// when l was closed by Close or Deny, records why in rec. Release comes
// first so that a flow no longer counted by NumOpenFlows has been
// released.
func (p *Proxy) untrack(l *LiveFlow, rec *FlowRecord) {
	l.ctx.Cancel(nil)
	p.release(&l.flow, l.verdict)
	p.live.remove(l)
	e := l.ending.Load()
	switch {
	case e == nil:
	case e.denied != nil:
		rec.Admitted, rec.Verdict = rec.Verdict, *e.denied
		rec.Flag, rec.Err = e.flag, fmt.Errorf("ztunnel: flow closed: now refused (%s) by policy %q", e.flag, e.denied.Policy)
	default:
		rec.Flag, rec.Err = e.flag, fmt.Errorf("ztunnel: flow closed: %s", e.flag)
	}
}

func (p *Proxy) release(f *Flow, v Verdict) {
	if r, ok := p.authz.(Releaser); ok {
		r.Release(f, v)
	}
}
