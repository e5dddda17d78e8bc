package telemetry

import (
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/ztunnel"
)

// NewFlow describes r in an access log line; event is events.Open or
// events.Close.
func NewFlow(r *ztunnel.FlowRecord, event string, now time.Time) events.Flow {
	svc := ""
	if r.Service != nil {
		svc = ServiceHost(r.Service)
	}
	return newFlow(r, event, now, svc)
}

// newFlow is NewFlow with ServiceHost(r.Service) given (ignored when r
// has no service), so that the Observer does not make the string anew
// for every flow.
func newFlow(r *ztunnel.FlowRecord, event string, now time.Time, svcHost string) events.Flow {
	f := events.Flow{
		Time: now, Kind: events.KindFlow, Event: event, ID: r.ID,
		Direction: string(r.Direction), Path: string(r.Path), MTLS: r.MTLS,
		Src:          events.Endpoint{Addr: r.Src, Identity: r.SrcID.String()},
		Dst:          events.Endpoint{Addr: r.Dst, Identity: r.DstID.String()},
		ResponseFlag: ztunnel.FlagNone.String(),
	}
	if w := r.SrcWorkload; w != nil {
		f.Src.Workload, f.Src.Namespace = w.Name, w.Namespace
	}
	if w := r.DstWorkload; w != nil {
		f.Dst.Workload, f.Dst.Namespace = w.Name, w.Namespace
	}
	if r.Service != nil {
		f.Dst.Service = svcHost
	}
	if v, ok := verdictOf(r); ok {
		f.Verdict, f.Reason, f.Policy, f.Rule = v, reasonOf(r), r.Verdict.Policy, r.Verdict.Rule
	}
	if event == events.Close {
		f.BytesSent, f.BytesReceived = r.Sent, r.Received
		f.DurationMS = float64(r.Duration.Microseconds()) / 1000
		f.ResponseFlag = r.Flag.String()
		if r.Err != nil {
			f.Error = r.Err.Error()
		}
	}
	return f
}

// OpenRecord describes the open flow l as a FlowRecord without outcome.
func OpenRecord(l *ztunnel.LiveFlow) ztunnel.FlowRecord {
	f := l.Flow()
	return ztunnel.FlowRecord{
		ID: l.ID(), Direction: l.Direction(), Path: l.Path(), Src: f.SrcAddr, Dst: f.DstAddr, OrigDst: l.OrigDst(),
		SrcID: f.SrcID, DstID: l.DstID(), SrcWorkload: f.Src, DstWorkload: f.Dst, Service: l.Service(),
		MTLS: f.MTLS, Verdict: l.Verdict(), Start: l.Start(),
	}
}

// verdictOf says whether r was judged by the Authorizer and how (events.Allowed or events.Denied). A zero
// Verdict is also what a flow that was never asked carries, so a denial is
// recognised by the flow ending with the verdict's flag.
func verdictOf(r *ztunnel.FlowRecord) (string, bool) {
	if r.Verdict.Allow {
		return events.Allowed, true
	}
	want := r.Verdict.Flag
	if want == ztunnel.FlagNone {
		want = ztunnel.FlagPolicyDenied
	}
	if r.Flag == want {
		return events.Denied, true
	}
	return "", false
}

// FlowFilter selects flows; zero fields match everything.
type FlowFilter struct {
	// Verdict is events.Allowed or events.Denied.
	Verdict string
	// Namespace matches the source's or the destination's namespace.
	Namespace string
	// Workload matches the source's or the destination's pod name, or
	// namespace/name.
	Workload string
	// Event is events.Open or events.Close.
	Event string
}

// Match reports whether ev passes f.
func (f FlowFilter) Match(ev *events.Flow) bool {
	if f.Verdict != "" && ev.Verdict != f.Verdict {
		return false
	}
	if f.Event != "" && ev.Event != f.Event {
		return false
	}
	if f.Namespace != "" && ev.Src.Namespace != f.Namespace && ev.Dst.Namespace != f.Namespace {
		return false
	}
	if f.Workload != "" && !endpointIs(ev.Src, f.Workload) && !endpointIs(ev.Dst, f.Workload) {
		return false
	}
	return true
}

func endpointIs(e events.Endpoint, name string) bool {
	if ns, n, ok := strings.Cut(name, "/"); ok {
		return e.Namespace == ns && e.Workload == n
	}
	return e.Workload == name
}

// DefaultFlowLogSize is how many recent flow events a FlowLog keeps.
const DefaultFlowLogSize = 4096

// MaxFollowers bounds the concurrent Follow subscriptions of a FlowLog.
const MaxFollowers = 32

// FlowLog keeps the most recent flow events in a ring buffer and streams
// new ones to followers. Adding never blocks: a follower that does not
// keep up loses events (and is told how many). Memory is bounded by the
// ring size and MaxFollowers × the followers' buffers.
type FlowLog struct {
	mu sync.Mutex
	// ring holds the events, compacted; it grows to size as events come
	// (an agent that saw few flows holds few), then the oldest is
	// overwritten.
	ring      []ringFlow
	size      int
	next      int // where the next event goes: len(ring) until it is full
	total     uint64
	followers map[*Follower]struct{}
}

// NewFlowLog returns a ring of size events (DefaultFlowLogSize if ≤ 0).
func NewFlowLog(size int) *FlowLog {
	if size <= 0 {
		size = DefaultFlowLogSize
	}
	return &FlowLog{size: size, followers: map[*Follower]struct{}{}}
}

// Add records ev and hands it to the followers whose filter it passes.
func (l *FlowLog) Add(ev events.Flow) {
	r := compact(&ev)
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := len(l.ring); n < l.size {
		if n == cap(l.ring) {
			grown := make([]ringFlow, n, min(max(2*n, 16), l.size))
			copy(grown, l.ring)
			l.ring = grown
		}
		l.ring = append(l.ring, r)
		l.next = len(l.ring) % l.size
	} else {
		l.ring[l.next] = r
		l.next = (l.next + 1) % l.size
	}
	l.total++
	for f := range l.followers {
		if !f.filter.Match(&ev) {
			continue
		}
		select {
		case f.c <- ev:
		default:
			f.lost++
		}
	}
}

// Recent returns up to limit of the newest events that pass f, oldest
// first (limit ≤ 0: all that the ring holds).
func (l *FlowLog) Recent(f FlowFilter, limit int) []events.Flow {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(l.ring)
	var out []events.Flow
	for i := 1; i <= n; i++ { // newest first
		ev := l.ring[(l.next-i+len(l.ring))%len(l.ring)].flow()
		if !f.Match(&ev) {
			continue
		}
		out = append(out, ev)
		if limit > 0 && len(out) == limit {
			break
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// Total counts every event ever added.
func (l *FlowLog) Total() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// Follower receives new flow events; see FlowLog.Follow.
type Follower struct {
	log    *FlowLog
	filter FlowFilter
	c      chan events.Flow
	lost   uint64
}

// ErrTooManyFollowers is returned by Follow when MaxFollowers are
// following already.
var ErrTooManyFollowers = errTooMany{}

type errTooMany struct{}

func (errTooMany) Error() string { return "telemetry: too many flow followers" }

// Follow subscribes to new events passing f, with a buffer of buf events
// (256 if ≤ 0). Call Close when done. It fails with ErrTooManyFollowers.
func (l *FlowLog) Follow(f FlowFilter, buf int) (*Follower, error) {
	if buf <= 0 {
		buf = 256
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.followers) >= MaxFollowers {
		return nil, ErrTooManyFollowers
	}
	fo := &Follower{log: l, filter: f, c: make(chan events.Flow, buf)}
	l.followers[fo] = struct{}{}
	return fo, nil
}

// C delivers the events.
func (f *Follower) C() <-chan events.Flow { return f.c }

// Lost returns and resets how many events were dropped because the
// follower's buffer was full.
func (f *Follower) Lost() uint64 {
	f.log.mu.Lock()
	defer f.log.mu.Unlock()
	n := f.lost
	f.lost = 0
	return n
}

// Close ends the subscription.
func (f *Follower) Close() {
	f.log.mu.Lock()
	defer f.log.mu.Unlock()
	delete(f.log.followers, f)
}
