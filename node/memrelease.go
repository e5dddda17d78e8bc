package node

import (
	"context"
	"log/slog"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory release: Go gives freed heap back to the operating system
// slowly (its scavenger), and an idle agent runs no garbage collection
// that would notice that thousands of flows ended. After a large drop
// in open flows the agent collects and releases at once, so that its
// resident memory falls back near its idle size within seconds
// (docs/performance.md, "Memory per connection").
const (
	// releaseEvery is how often the open flows are looked at.
	releaseEvery = 5 * time.Second
	// releaseMinDrop is the smallest drop from the peak that releases:
	// a few hundred flows hold a few MiB, not worth a full collection.
	releaseMinDrop = 1000
)

// releaseMemory calls debug.FreeOSMemory when the open flows (flows())
// fell by releaseMinDrop and by half since their peak, looking every
// releaseEvery until ctx ends. A release costs one full collection,
// at most once per releaseEvery and only after such a drop.
func releaseMemory(ctx context.Context, flows func() int, log *slog.Logger) {
	t := time.NewTicker(releaseEvery)
	defer t.Stop()
	peak := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n := flows()
		peak = max(peak, n)
		if peak-n < releaseMinDrop || n > peak/2 {
			continue
		}
		before := heapMapped()
		start := time.Now()
		debug.FreeOSMemory()
		log.Debug("released memory after open flows fell", "peak_flows", peak, "open_flows", n,
			"heap_mapped_before", before, "heap_mapped_after", heapMapped(), "took", time.Since(start))
		peak = n
	}
}

// heapMapped is the heap memory the process holds from the operating
// system: everything but what was released.
func heapMapped() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64() - s[1].Value.Uint64()
}
