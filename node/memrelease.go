package node

import (
	"context"
	"log/slog"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory release: Go gives freed heap back to the operating system
// slowly (its scavenger), and an agent whose flows sit idle allocates
// nothing, so it runs no garbage collection that would find the garbage
// their setup left, nor one that would notice that thousands of flows
// ended. Once the open flows moved by releaseMinDrop either way and then
// held steady for a look, the agent collects and releases at once: its
// resident memory then is what its flows hold (docs/performance.md,
// "Memory per connection").
const (
	// releaseEvery is how often the open flows are looked at.
	releaseEvery = 2 * time.Second
	// releaseMinDrop is the smallest change of the open flows that
	// releases: a few hundred flows hold a few MiB, not worth a full
	// collection.
	releaseMinDrop = 1000
)

// releaseMemory calls debug.FreeOSMemory when the open flows (flows())
// moved by releaseMinDrop since the last release and by less than a
// tenth of that since the last look, looking every releaseEvery until ctx
// ends. A release costs one full collection, at most once per
// releaseEvery and only after such a change.
func releaseMemory(ctx context.Context, flows func() int, log *slog.Logger) {
	t := time.NewTicker(releaseEvery)
	defer t.Stop()
	prev, base := 0, 0 // open flows at the last look, at the last release
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n := flows()
		steady := abs(n-prev) < releaseMinDrop/10
		prev = n
		if !steady || abs(n-base) < releaseMinDrop {
			continue
		}
		before := heapMapped()
		start := time.Now()
		debug.FreeOSMemory()
		log.Debug("released memory after the open flows changed", "open_flows_before", base, "open_flows", n,
			"heap_mapped_before", before, "heap_mapped_after", heapMapped(), "took", time.Since(start))
		base = n
	}
}

func abs(n int) int { return max(n, -n) }

// heapMapped is the heap memory the process holds from the operating
// system: everything but what was released.
func heapMapped() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64() - s[1].Value.Uint64()
}

// releaseNow collects and gives the free heap back to the operating
// system at once (one full collection), saying why at debug level.
func releaseNow(log *slog.Logger, why string) {
	before := heapMapped()
	start := time.Now()
	debug.FreeOSMemory()
	log.Debug("released memory", "why", why, "heap_mapped_before", before, "heap_mapped_after", heapMapped(), "took", time.Since(start))
}
