package telemetry

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/ztunnel"
)

// realisticFlows makes n flow events as a busy agent sees them: opens
// and closes of a few workload pairs, each connection from its own port,
// one close in 16 with an error of its own (a reset names both ends).
func realisticFlows(n int) []events.Flow {
	t0 := time.Date(2026, 12, 6, 22, 0, 0, 0, time.UTC)
	out := make([]events.Flow, 0, n)
	for i := range n {
		r := hboneOut(uint64(i/2 + 1))
		port := uint16(20000 + i/2)
		r.Src = netip.AddrPortFrom(r.Src.Addr(), port)
		if i%4 >= 2 {
			r.Direction, r.Service = ztunnel.Inbound, nil
		}
		ev := events.Open
		if i%2 == 1 {
			ev = events.Close
			r.Sent, r.Received, r.Duration = int64(i*100), int64(i*7), time.Duration(i)*time.Millisecond
			if i%32 == 1 {
				r.Flag = ztunnel.FlagUpstreamReset
				r.Err = fmt.Errorf("hbone: read tcp %s->198.19.2.10:15008: %w", r.Src, errors.New("connection reset by peer"))
			}
		}
		out = append(out, NewFlow(r, ev, t0.Add(time.Duration(i)*time.Millisecond)))
	}
	return out
}

// ringBytesPerEvent is what a full FlowLog of the default size keeps on
// the heap, per event, once the events it was given are gone.
func ringBytesPerEvent(tb testing.TB) float64 {
	const n = DefaultFlowLogSize
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := NewFlowLog(n)
	for _, ev := range realisticFlows(n) {
		l.Add(ev)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if got := len(l.Recent(FlowFilter{}, 0)); got != n {
		tb.Fatalf("the ring holds %d events, want %d", got, n)
	}
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
}

// TestFlowLogKeepsEventsCompactly: a full ring of realistic flows costs
// at most 150 bytes an event (an events.Flow is ~470, with its strings).
func TestFlowLogKeepsEventsCompactly(t *testing.T) {
	if b := ringBytesPerEvent(t); b > 150 {
		t.Errorf("the flow ring keeps %.0f bytes per event, want ≤ 150", b)
	}
}

// BenchmarkFlowLogMemory reports the heap a full default ring keeps per
// event (bytes/event) and the cost of adding one.
func BenchmarkFlowLogMemory(b *testing.B) {
	perEvent := ringBytesPerEvent(b)
	evs := realisticFlows(DefaultFlowLogSize)
	l := NewFlowLog(0)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		l.Add(evs[i%len(evs)])
	}
	b.ReportMetric(perEvent, "bytes/event")
}

// TestFlowLogGivesBackWhatItWasGiven: every field of every event comes
// back from Recent and Follow as it was added.
func TestFlowLogGivesBackWhatItWasGiven(t *testing.T) {
	evs := realisticFlows(64)
	odd := events.Flow{Kind: events.KindSecurityEvent, Event: events.Audit, Stage: events.StageConnect, Node: "n1",
		ID: 99, Src: events.Endpoint{Addr: netip.MustParseAddrPort("[fe80::1%eth0]:443"), Workload: "a"},
		Dst:         events.Endpoint{Addr: netip.MustParseAddrPort("[2001:db8::2]:80"), Service: "s.ns.svc.cluster.local"},
		AuditPolicy: "ns/audit", AuditRule: 3, Rule: -1, Policy: "ns/p", Reason: "r", Verdict: events.Allowed,
		Time: time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("X", 3600))}
	evs = append(evs, odd, events.Flow{ID: 100}, events.Flow{ID: 101, Src: events.Endpoint{Addr: netip.MustParseAddrPort("[::ffff:1.2.3.4]:5")}})
	l := NewFlowLog(len(evs))
	fo, err := l.Follow(FlowFilter{}, len(evs))
	if err != nil {
		t.Fatal(err)
	}
	defer fo.Close()
	for _, ev := range evs {
		l.Add(ev)
	}
	got := l.Recent(FlowFilter{}, 0)
	if len(got) != len(evs) {
		t.Fatalf("Recent: %d events, want %d", len(got), len(evs))
	}
	for i := range evs {
		if !reflect.DeepEqual(got[i], evs[i]) {
			t.Errorf("Recent: event %d\n%+v\nwant\n%+v", i, got[i], evs[i])
		}
		if f := <-fo.C(); !reflect.DeepEqual(f, evs[i]) {
			t.Errorf("Follow: event %d\n%+v\nwant\n%+v", i, f, evs[i])
		}
	}
}

// TestTrafficGivesBackTheMemoryOf10000Flows: once 10,000 flows were
// opened and closed, the per-flow state of the TCP metrics is back to
// (nearly) its size before them, and every flow was counted.
func TestTrafficGivesBackTheMemoryOf10000Flows(t *testing.T) {
	const n = 10_000
	tr := NewTraffic()
	recs := make([]*ztunnel.FlowRecord, n)
	for i := range recs {
		recs[i] = hboneOut(uint64(i + 1))
		recs[i].Sent = 10
	}
	tr.Opened(recs[0]) // the label sets exist before the measure
	tr.Closed(recs[0])
	var ms runtime.MemStats
	heap := func() int64 { runtime.GC(); runtime.ReadMemStats(&ms); return int64(ms.HeapAlloc) }
	before := heap()
	for _, r := range recs[1:] {
		tr.Opened(r)
	}
	if got := tr.OpenFlows(); got != n-1 {
		t.Fatalf("%d open flows, want %d", got, n-1)
	}
	for _, r := range recs[1:] {
		tr.Closed(r)
	}
	kept := heap() - before
	t.Logf("traffic state after %d flows: %d KiB kept", n, kept>>10)
	if kept > 64<<10 {
		t.Errorf("the traffic metrics keep %d KiB after %d flows ended, want ≤ 64 KiB", kept>>10, n)
	}
	if got := tr.OpenFlows(); got != 0 {
		t.Errorf("%d open flows after all ended", got)
	}
	if got := testutil.ToFloat64(tr.received); got != 10*n {
		t.Errorf("received bytes counted: %v, want %d", got, 10*n)
	}
	runtime.KeepAlive(recs)
}
