package ztunnel

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRefusalLogKeepsToItsRateAndSumsUpTheRest writes 1000 refusals in
// one instant at 10 lines per second: a burst of 50 lines is written, the
// other 950 are counted by reason and summed up in one line; a second
// later 10 more lines may be written.
func TestRefusalLogKeepsToItsRateAndSumsUpTheRest(t *testing.T) {
	var buf bytes.Buffer
	r := newRefusalLog(slog.New(slog.NewJSONHandler(&buf, nil)), 10)
	now := time.Unix(1e9, 0)
	r.now = func() time.Time { return now }
	r.summaryEvery = time.Hour // summarized by hand below
	for i := range 1000 {
		flag := FlagPendingLimit
		if i%4 == 0 {
			flag = FlagSourceLimit
		}
		r.logf(slog.LevelInfo, flag, "ztunnel: refused", "reason", flag.String())
	}
	lines := func() []map[string]any {
		var out []map[string]any
		for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
			var m map[string]any
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatalf("line %q: %v", l, err)
			}
			out = append(out, m)
		}
		buf.Reset()
		return out
	}
	if got := lines(); len(got) != 50 {
		t.Fatalf("%d lines for 1000 refusals at once, want the burst of 50", len(got))
	}
	r.summarize()
	got := lines()
	if len(got) != 1 || got[0]["msg"] != "ztunnel: more refusals not logged" || got[0]["suppressed"] != 950.0 {
		t.Fatalf("summary = %v, want one line saying 950 were suppressed", got)
	}
	by, _ := got[0]["by_reason"].(map[string]any)
	if by["pending_limit"] != 713.0 || by["source_limit"] != 237.0 || len(by) != 2 {
		t.Errorf("by_reason = %v, want pending_limit 713 and source_limit 237 (the burst took 37 and 13)", by)
	}
	r.summarize()
	if buf.Len() != 0 {
		t.Errorf("a summary with nothing suppressed: %s", buf.String())
	}

	now = now.Add(time.Second)
	for range 20 {
		r.logf(slog.LevelWarn, FlagAcceptFailed, "ztunnel: accept failed")
	}
	if got := lines(); len(got) != 10 {
		t.Errorf("%d lines a second later, want the 10 the rate refilled", len(got))
	}
	r.mu.Lock()
	armed := r.timer != nil
	r.mu.Unlock()
	if !armed {
		t.Error("lines were suppressed but no summary is due")
	}
	r.summarize()
}

// TestRefusalLogSummarizesOnItsOwn checks that a summary comes by itself
// once lines are suppressed, and only then.
func TestRefusalLogSummarizesOnItsOwn(t *testing.T) {
	var buf syncBuffer
	r := newRefusalLog(slog.New(slog.NewJSONHandler(&buf, nil)), 1)
	r.summaryEvery = 20 * time.Millisecond
	for range 8 {
		r.logf(slog.LevelInfo, FlagHandshakeTimeout, "ztunnel: refused")
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(buf.String(), `"suppressed":3`) {
		if time.Now().After(deadline) {
			t.Fatalf("no summary within 5 s; log:\n%s", buf.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
