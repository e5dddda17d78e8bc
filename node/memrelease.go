package node

import (
	"context"
	"log/slog"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory release: Go gives freed heap back to the operating system
// slowly (its scavenger), and an agent whose flows sit idle allocates
// nothing, so it runs no garbage collection that would find the garbage
// their setup left, nor one that would notice that thousands of flows
// ended. Once the open flows, or the HBONE connections under them, moved
// by releaseMinFlows (releaseMinConns) either way and then held steady
// for a look, the agent collects and releases at once: its resident
// memory then is what its flows hold (docs/performance.md, "Memory per
// connection").
const (
	// releaseEvery is how often the open flows are looked at.
	releaseEvery = 2 * time.Second
	// releaseMinFlows is the smallest change of the open flows that
	// releases: a few hundred flows hold a few MiB, not worth a full
	// collection.
	releaseMinFlows = 1000
	// releaseMinConns is the smallest change of the open HBONE
	// connections that releases: each holds about 60 KiB (TLS state,
	// HTTP/2 tables, two goroutines), so 32 hold about what 1,000 idle
	// flows hold of heap. The client pool closes its spare connections a
	// few seconds after the flows on them ended (hbone.Tuning's
	// SpareIdleTimeout): a second release then gives their memory back.
	releaseMinConns = 32
)

// load is what the agent's memory follows: its open flows and the HBONE
// connections that carry them.
type load struct{ flows, conns int }

// moved reports whether l and o differ by at least a release's worth
// (div 1) or a tenth of it (div 10).
func (l load) moved(o load, div int) bool {
	return abs(l.flows-o.flows) >= releaseMinFlows/div || abs(l.conns-o.conns) >= releaseMinConns/div
}

// releaseMemory releases (release) when the load (now()) moved by
// a release's worth since the last release and by less than a tenth of
// that since the last look, looking every releaseEvery until ctx ends. A
// release costs one full collection, at most once per releaseEvery and
// only after such a change.
func releaseMemory(ctx context.Context, now func() load, log *slog.Logger) {
	t := time.NewTicker(releaseEvery)
	defer t.Stop()
	var prev, base load // at the last look, at the last release
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n := now()
		steady := !n.moved(prev, 10)
		prev = n
		if !steady || !n.moved(base, 1) {
			continue
		}
		release(log, "the open flows changed", "open_flows_before", base.flows, "open_flows", n.flows,
			"hbone_conns_before", base.conns, "hbone_conns", n.conns)
		base = n
	}
}

// settleEvery is how often releaseOnceSettled looks whether the agent is
// ready, and settleWait how long it looks.
const (
	settleEvery = 100 * time.Millisecond
	settleWait  = 30 * time.Second
)

// releaseOnceSettled releases (release) once the agent has settled:
// settled() held at two looks in a row, settleEvery apart (or settleWait
// passed). Its start does not end with "agent running" but with the first
// enrolments (programs loaded and attached to the pods' veths, their
// certificates issued just after), whose code the agent does not run
// again until pods change.
func releaseOnceSettled(ctx context.Context, settled func() bool, log *slog.Logger) {
	t := time.NewTicker(settleEvery)
	defer t.Stop()
	deadline := time.Now().Add(settleWait)
	for held := 0; held < 2 && time.Now().Before(deadline); {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if settled() {
			held++
		} else {
			held = 0
		}
	}
	release(log, "the agent settled")
}

func abs(n int) int { return max(n, -n) }

// heapMapped is the heap memory the process holds from the operating
// system: everything but what was released.
func heapMapped() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64() - s[1].Value.Uint64()
}

// release collects and gives the free heap back to the operating system
// at once (two full collections), takes the executable's pages out of the
// resident set (dropBinaryPages), and says why at debug level, with
// attrs.
func release(log *slog.Logger, why string, attrs ...any) {
	before := heapMapped()
	start := time.Now()
	// Two collections: what sync.Pools hold (pooled buffers, TLS and
	// HTTP/2 state) survives one collection as the pools' victims, and
	// would keep their spans in use until the next, which an idle agent
	// may not run for minutes.
	runtime.GC()
	debug.FreeOSMemory()
	spanned, err := dropBinaryPages()
	if err != nil {
		// Only the resident figure is at stake: the pages were left as
		// they were.
		log.Warn("could not drop the executable's pages from memory", "error", err)
	}
	log.Debug("released memory", append([]any{"why", why, "heap_mapped_before", before, "heap_mapped_after", heapMapped(),
		"binary_mappings_dropped", spanned, "took", time.Since(start)}, attrs...)...)
}
