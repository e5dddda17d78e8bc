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
// ended. The agent follows what its load holds: once the open flows and
// the HBONE connections under them together moved by what holds
// releaseMinBytes (either way, each counted at its estimate) and then held
// steady for a look, it collects and releases at once: its resident
// memory then is what its flows hold (docs/performance.md, "Memory per
// connection").
const (
	// releaseEvery is how often the load is looked at.
	releaseEvery = 2 * time.Second
	// flowBytes is about what an open flow holds at each end's agent
	// (2.1-2.6 KiB measured with 10,000 open, docs/performance.md).
	flowBytes = 2 << 10
	// connBytes is about what an HBONE connection holds: its TLS state,
	// HTTP/2 tables and two goroutines (60 KiB and more, by the streams it
	// carried). The client pool closes its spare connections a few
	// seconds after the flows on them ended (hbone.Tuning's
	// SpareIdleTimeout): what they held is given back by a second
	// release, once they moved by releaseMinBytes too.
	connBytes = 64 << 10
	// releaseMinBytes is the smallest change of the load that releases: a
	// full collection is not worth less (512 flows or 16 connections),
	// and what smaller changes leave is within a few percent of an idle
	// agent's 17-20 MiB.
	releaseMinBytes = 1 << 20
)

// load is what the agent's memory follows: its open flows and the HBONE
// connections that carry them.
type load struct{ flows, conns int }

// moved reports whether l and o differ by at least a release's worth
// (div 1) or a tenth of it (div 10): their differences in flows and in
// connections each weighed at what one holds, and added, so that flows
// that went up while connections went down do not cancel out.
func (l load) moved(o load, div int) bool {
	return int64(abs(l.flows-o.flows))*flowBytes+int64(abs(l.conns-o.conns))*connBytes >= releaseMinBytes/int64(div)
}

// releaser decides when a release is due: when the load moved by a
// release's worth since the last release, and by less than a tenth of
// that since the last look.
type releaser struct {
	prev, base load // at the last look, at the last release
}

// look takes the load now, and reports whether to release, and the load
// at the last release.
func (r *releaser) look(n load) (last load, release bool) {
	steady := !n.moved(r.prev, 10)
	r.prev = n
	if !steady || !n.moved(r.base, 1) {
		return r.base, false
	}
	last, r.base = r.base, n
	return last, true
}

// releaseMemory releases (release) when a releaser says so of the load
// (now()), looking every releaseEvery until ctx ends. A release costs two
// full collections, at most once per releaseEvery and only after such a
// change.
func releaseMemory(ctx context.Context, now func() load, log *slog.Logger) {
	t := time.NewTicker(releaseEvery)
	defer t.Stop()
	var r releaser
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n := now()
		base, ok := r.look(n)
		if !ok {
			continue
		}
		release(log, "the load changed", "open_flows_before", base.flows, "open_flows", n.flows,
			"hbone_conns_before", base.conns, "hbone_conns", n.conns)
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
