package telemetry

import (
	"context"
	"io"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/ztunnel"
)

// BenchmarkObserverFlow is what one connection costs the ztunnel's
// goroutines in telemetry: the open and end hooks with metrics, the flow
// ring and the access log queue (written by its own goroutine).
func BenchmarkObserverFlow(b *testing.B) {
	a := events.NewWriter(io.Discard, events.WriterOptions{Rate: 1e9, Burst: 1 << 30})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		a.Run(ctx)
		close(done)
	}()
	o := NewObserver(ObserverOptions{AccessLog: a, Flows: NewFlowLog(0)})
	r := hboneOut(0)
	r.Direction = "inbound"
	r.Sent, r.Received, r.Duration = 1000, 2000, time.Millisecond
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		r.ID = uint64(i + 1)
		o.Traffic.Opened(r)
		o.Traffic.Flush(r.ID, 500, 500)
		o.FlowEnded(r)
	}
	b.StopTimer()
	cancel()
	<-done
}

// BenchmarkTrafficFlush is the periodic flush's cost per open flow.
func BenchmarkTrafficFlush(b *testing.B) {
	tr := NewTraffic()
	r := hboneOut(1)
	tr.Opened(r)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		tr.Flush(1, int64(i+1), int64(i+1))
	}
}

// openRecords makes n flows as one agent of a pair sees them when one pod
// opens n connections to another through a service: each from its own
// port, ids from first. The source's are outbound, the destination's
// inbound.
func openRecords(first uint64, n int, dir ztunnel.Direction) []*ztunnel.FlowRecord {
	out := make([]*ztunnel.FlowRecord, n)
	for i := range out {
		r := hboneOut(first + uint64(i))
		r.Direction = dir
		r.Src = netip.AddrPortFrom(r.Src.Addr(), uint16(10000+i%50000))
		r.Start = time.Date(2026, 12, 7, 1, 0, 0, 0, time.UTC)
		out[i] = r
	}
	return out
}

// openFlowBytes is the heap an Observer (metrics and a full flow ring,
// as the agent has them) keeps per open flow while recs are open: what
// opening them added, once the garbage is collected.
func openFlowBytes(tb testing.TB, o *Observer, recs []*ztunnel.FlowRecord) float64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for _, r := range recs {
		o.opened(r)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if n := o.Traffic.OpenFlows(); n != len(recs) {
		tb.Fatalf("%d flows open, want %d", n, len(recs))
	}
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(len(recs))
}

// warmObserver is an Observer whose flow ring is full and whose series
// exist, so that what follows costs only what flows cost.
func warmObserver(dir ztunnel.Direction) *Observer {
	o := NewObserver(ObserverOptions{Flows: NewFlowLog(0)})
	for _, r := range openRecords(1<<40, DefaultFlowLogSize/2, dir) {
		o.opened(r)
		r.Sent, r.Received = 1, 1
		o.FlowEnded(r)
	}
	return o
}

// BenchmarkOpenFlows reports what telemetry keeps per open flow
// (B/openflow: 10,000 flows open at once) and what a flow costs from
// open to close through the Observer (one flush of its bytes between):
// ns, bytes and allocations per op, an op being one flow.
func BenchmarkOpenFlows(b *testing.B) {
	for _, dir := range []ztunnel.Direction{ztunnel.Outbound, ztunnel.Inbound} {
		b.Run(string(dir), func(b *testing.B) {
			const n = 10_000
			o := warmObserver(dir)
			recs := openRecords(1, n, dir)
			perFlow := openFlowBytes(b, o, recs)
			for _, r := range recs {
				o.FlowEnded(r)
			}
			recs = openRecords(n+1, n, dir)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				r := recs[i%n]
				r.ID = uint64(n + 1 + i)
				o.opened(r)
				o.Traffic.Flush(r.ID, 100, 200)
				r.Sent, r.Received = 1000, 2000
				o.FlowEnded(r)
			}
			b.StopTimer()
			b.ReportMetric(perFlow, "B/openflow")
		})
	}
}
