package node

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// releases is a slog handler that counts "released memory" records.
type releases struct {
	mu  sync.Mutex
	why []string
}

func (r *releases) Enabled(context.Context, slog.Level) bool { return true }
func (r *releases) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *releases) WithGroup(string) slog.Handler            { return r }
func (r *releases) Handle(_ context.Context, rec slog.Record) error {
	if rec.Message != "released memory" {
		return nil
	}
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "why" {
			r.mu.Lock()
			r.why = append(r.why, a.Value.String())
			r.mu.Unlock()
		}
		return true
	})
	return nil
}

// TestReleaseOnceSettledWaitsForTheAgentToHoldStill: the release comes
// once, after settled() held at two looks in a row, not at the first
// ready look; a context that ends first releases nothing.
func TestReleaseOnceSettledWaitsForTheAgentToHoldStill(t *testing.T) {
	seq := []bool{false, true, false, true, true}
	var looks atomic.Int32
	settled := func() bool {
		i := int(looks.Add(1)) - 1
		return i < len(seq) && seq[i] || i >= len(seq)
	}
	h := &releases{}
	releaseOnceSettled(t.Context(), settled, slog.New(h))
	if n := looks.Load(); n != int32(len(seq)) {
		t.Errorf("released after %d looks, want %d (the first two ready looks in a row)", n, len(seq))
	}
	if len(h.why) != 1 || h.why[0] != "the agent settled" {
		t.Errorf("releases: %q, want one, \"the agent settled\"", h.why)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 3*settleEvery)
	defer cancel()
	h = &releases{}
	start := time.Now()
	releaseOnceSettled(ctx, func() bool { return false }, slog.New(h))
	if len(h.why) != 0 {
		t.Errorf("an agent that never settled, stopped after %v: releases %q, want none", time.Since(start), h.why)
	}
}
