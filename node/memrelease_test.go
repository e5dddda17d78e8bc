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

// TestReleaseFollowsTheLoadDown: a burst of flows to one pod and their
// end release when the flows closed, and again once the pool closed the
// spare HBONE connections that carried them, however many streams each
// carried; a change too small for a collection, or one still under way,
// releases nothing.
func TestReleaseFollowsTheLoadDown(t *testing.T) {
	type step struct {
		l    load
		want bool
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"10,000 flows on 50 connections", []step{
			{load{0, 1}, false},
			{load{10_000, 50}, false}, // rising
			{load{10_000, 50}, true},  // steady: the setup's garbage
			{load{0, 50}, false},      // closing
			{load{0, 50}, true},       // the flows' memory
			{load{0, 1}, false},       // the pool closed its spares
			{load{0, 1}, true},        // their memory
			{load{0, 1}, false},
		}},
		{"5,000 flows on 25 connections", []step{
			{load{5_000, 25}, false},
			{load{5_000, 25}, true},
			{load{0, 25}, false},
			{load{0, 25}, true},
			{load{0, 1}, false},
			{load{0, 1}, true}, // 24 connections: 1.5 MiB
		}},
		{"600 flows on 3 connections", []step{
			{load{600, 3}, false},
			{load{600, 3}, true},
			{load{0, 3}, false},
			{load{0, 3}, true},
			{load{0, 1}, false},
			{load{0, 1}, false}, // two connections are not worth a collection
		}},
		{"flows up, connections down", []step{
			{load{0, 40}, false},
			{load{0, 40}, true},
			{load{500, 20}, false},
			{load{500, 20}, true}, // 1 MiB of flows in, 1.25 MiB of connections out
		}},
		{"churn that never holds still", []step{
			{load{1_000, 10}, false},
			{load{1_300, 10}, false},
			{load{1_000, 10}, false},
			{load{1_300, 12}, false},
			{load{1_600, 12}, false},
		}},
		{"small steps", []step{
			{load{100, 1}, false},
			{load{200, 1}, false},
			{load{300, 1}, false},
			{load{400, 1}, false},
			{load{500, 1}, false},
			{load{540, 1}, true}, // 540 flows and a connection since none: 1.1 MiB
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r releaser
			for i, s := range tc.steps {
				last, got := r.look(s.l)
				if got != s.want {
					t.Errorf("look %d at %+v (last release at %+v): release %v, want %v", i, s.l, last, got, s.want)
				}
			}
		})
	}
}
