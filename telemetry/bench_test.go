package telemetry

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/mantlet/mantlet/events"
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
