package telemetry

import (
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/ztunnel"
)

// Flow event kinds.
const (
	EventOpen  = "open"
	EventClose = "close"
)

// Verdicts of a flow, as access logs and the flow API show them.
const (
	VerdictAllowed = "allowed"
	VerdictDenied  = "denied"
)

// Endpoint is one end of a flow.
type Endpoint struct {
	// Addr is ip:port.
	Addr string `json:"addr"`
	// Workload (pod name) and Namespace are empty when the address is no
	// known workload.
	Workload  string `json:"workload,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	// Identity is the SPIFFE ID: authenticated for the source (empty for
	// plaintext), the workload's for the destination.
	Identity string `json:"identity,omitempty"`
	// Service is the service the client dialled (destination only), as
	// <name>.<namespace>.svc.cluster.local.
	Service string `json:"service,omitempty"`
}

// FlowEvent is one line of the access log and one entry of the recent
// flows that the admin API serves.
type FlowEvent struct {
	Time  time.Time `json:"time"`
	Event string    `json:"event"` // open or close
	// ID is the ztunnel's flow id (0 for flows refused before they were
	// registered); the open and close events of a flow share it.
	ID uint64 `json:"id,omitempty"`
	// Direction: outbound, inbound (HBONE) or inbound_plaintext; Path:
	// hbone, local or passthrough.
	Direction string   `json:"direction"`
	Path      string   `json:"path,omitempty"`
	Src       Endpoint `json:"src"`
	Dst       Endpoint `json:"dst"`
	// HBONEAddr is the CONNECT target (:authority) when the flow went
	// over HBONE.
	HBONEAddr string `json:"hbone_addr,omitempty"`
	MTLS      bool   `json:"mtls"`
	// BytesSent went from the client to the destination, BytesReceived
	// back (at close; 0 at open).
	BytesSent     int64 `json:"bytes_sent"`
	BytesReceived int64 `json:"bytes_received"`
	// DurationMS is how long the flow lasted, in milliseconds (close).
	DurationMS float64 `json:"duration_ms"`
	// ResponseFlag is "-" or why the flow was refused or failed.
	ResponseFlag string `json:"response_flag"`
	// Verdict is allowed, denied, or empty when no policy was asked (the
	// flow was refused before); Reason says why (the policy engine's
	// reason when the authorizer gave one). Policy and Rule name the
	// deciding policy and the index of its rule. A flow cut by a policy
	// change closes denied, with the policy that cut it (its open event
	// was allowed); an outbound HBONE flow the destination refused with
	// 401 is denied, reason ztunnel.ReasonDeniedByDestination, no policy.
	Verdict string `json:"verdict,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Policy  string `json:"policy,omitempty"`
	Rule    *int   `json:"rule,omitempty"`
	Error   string `json:"error,omitempty"`
}

// NewFlowEvent describes r; event is EventOpen or EventClose.
func NewFlowEvent(r *ztunnel.FlowRecord, event string, now time.Time) FlowEvent {
	ev := FlowEvent{
		Time: now, Event: event, ID: r.ID,
		Direction: string(r.Direction), Path: string(r.Path),
		Src:  Endpoint{Addr: addrString(r.Src)},
		Dst:  Endpoint{Addr: addrString(r.Dst)},
		MTLS: r.MTLS, ResponseFlag: ztunnel.FlagNone.String(),
	}
	if w := r.SrcWorkload; w != nil {
		ev.Src.Workload, ev.Src.Namespace = w.Name, w.Namespace
	}
	if !r.SrcID.IsZero() {
		ev.Src.Identity = r.SrcID.String()
	}
	if w := r.DstWorkload; w != nil {
		ev.Dst.Workload, ev.Dst.Namespace = w.Name, w.Namespace
	}
	if !r.DstID.IsZero() {
		ev.Dst.Identity = r.DstID.String()
	}
	if r.Service != nil {
		ev.Dst.Service = ServiceHost(r.Service)
	}
	if r.Path == ztunnel.PathHBONE && r.Dst.IsValid() {
		ev.HBONEAddr = r.Dst.String()
	}
	if v, ok := verdictOf(r); ok {
		ev.Verdict, ev.Reason = v, reasonOf(r)
		if r.Verdict.Policy != "" {
			ev.Policy = r.Verdict.Policy
			rule := r.Verdict.Rule
			ev.Rule = &rule
		}
	}
	if event == EventClose {
		ev.BytesSent, ev.BytesReceived = r.Sent, r.Received
		ev.DurationMS = float64(r.Duration.Microseconds()) / 1000
		ev.ResponseFlag = r.Flag.String()
		if r.Err != nil {
			ev.Error = r.Err.Error()
		}
	}
	return ev
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

// verdictOf says whether r was judged by the Authorizer and how. A zero
// Verdict is also what a flow that was never asked carries, so a denial is
// recognised by the flow ending with the verdict's flag.
func verdictOf(r *ztunnel.FlowRecord) (string, bool) {
	if r.Verdict.Allow {
		return VerdictAllowed, true
	}
	want := r.Verdict.Flag
	if want == ztunnel.FlagNone {
		want = ztunnel.FlagPolicyDenied
	}
	if r.Flag == want {
		return VerdictDenied, true
	}
	return "", false
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// FlowFilter selects flow events; zero fields match everything.
type FlowFilter struct {
	// Verdict is allowed or denied.
	Verdict string
	// Namespace matches the source's or the destination's namespace.
	Namespace string
	// Workload matches the source's or the destination's pod name, or
	// namespace/name.
	Workload string
	// Event is open or close.
	Event string
}

// Match reports whether ev passes f.
func (f FlowFilter) Match(ev *FlowEvent) bool {
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

func endpointIs(e Endpoint, name string) bool {
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
	mu        sync.Mutex
	ring      []FlowEvent
	next      int  // where the next event goes
	full      bool // the ring has wrapped
	total     uint64
	followers map[*Follower]struct{}
}

// NewFlowLog returns a ring of size events (DefaultFlowLogSize if ≤ 0).
func NewFlowLog(size int) *FlowLog {
	if size <= 0 {
		size = DefaultFlowLogSize
	}
	return &FlowLog{ring: make([]FlowEvent, size), followers: map[*Follower]struct{}{}}
}

// Add records ev and hands it to the followers whose filter it passes.
func (l *FlowLog) Add(ev FlowEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ring[l.next] = ev
	l.next = (l.next + 1) % len(l.ring)
	if l.next == 0 {
		l.full = true
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
func (l *FlowLog) Recent(f FlowFilter, limit int) []FlowEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	var out []FlowEvent
	for i := 1; i <= n; i++ { // newest first
		ev := &l.ring[(l.next-i+len(l.ring))%len(l.ring)]
		if !f.Match(ev) {
			continue
		}
		out = append(out, *ev)
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
	c      chan FlowEvent
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
	fo := &Follower{log: l, filter: f, c: make(chan FlowEvent, buf)}
	l.followers[fo] = struct{}{}
	return fo, nil
}

// C delivers the events.
func (f *Follower) C() <-chan FlowEvent { return f.c }

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
