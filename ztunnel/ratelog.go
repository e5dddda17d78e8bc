package ztunnel

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Defaults of the refusal log's rate limit.
const (
	// DefaultRefusalLogRate is the default of Limits.RefusalLogRate.
	DefaultRefusalLogRate = 10
	// refusalLogBurst is how many lines the limit lets through at once,
	// in seconds of its rate.
	refusalLogBurst = 5
	// refusalSummaryEvery is how often, while lines are suppressed, one
	// line sums them up.
	refusalSummaryEvery = 5 * time.Second
)

// refusalLog writes the log lines of refusals that are not flows (TLS
// handshakes, limits, accept errors) through a token bucket: a flood of
// refusals costs a bounded number of lines. Lines over the rate are
// counted by reason, and while any are, one line every summaryEvery says
// how many were not written. The counters of the refusals themselves are
// kept by the caller, unlimited.
type refusalLog struct {
	log          *slog.Logger
	rate, burst  float64
	summaryEvery time.Duration
	now          func() time.Time

	mu         sync.Mutex
	tokens     float64
	last       time.Time
	suppressed [numFlags]uint64
	total      uint64
	timer      *time.Timer // armed while lines are suppressed and no summary is due
}

func newRefusalLog(log *slog.Logger, rate float64) *refusalLog {
	if rate <= 0 {
		rate = DefaultRefusalLogRate
	}
	burst := max(1, rate*refusalLogBurst)
	return &refusalLog{log: log, rate: rate, burst: burst, tokens: burst, summaryEvery: refusalSummaryEvery, now: time.Now}
}

// logf writes msg with attrs at level if the rate allows; otherwise it
// counts a line suppressed for flag.
func (r *refusalLog) logf(level slog.Level, flag ResponseFlag, msg string, attrs ...any) {
	if r.allow(level, flag) {
		r.log.Log(context.Background(), level, msg, attrs...)
	}
}

// allow takes a token for a line at level and reports true, or counts the
// line suppressed for flag and reports false. Callers that build costly
// attributes ask first.
func (r *refusalLog) allow(level slog.Level, flag ResponseFlag) bool {
	if !r.log.Enabled(context.Background(), level) {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	if !r.last.IsZero() {
		r.tokens = min(r.burst, r.tokens+now.Sub(r.last).Seconds()*r.rate)
	}
	r.last = now
	if r.tokens >= 1 {
		r.tokens--
		return true
	}
	r.suppressed[flag]++
	r.total++
	if r.timer == nil {
		r.timer = time.AfterFunc(r.summaryEvery, r.summarize)
	}
	return false
}

// summarize writes how many lines were suppressed since the last summary,
// by reason, and resets the counts.
func (r *refusalLog) summarize() {
	r.mu.Lock()
	total := r.total
	var by []any
	for i, n := range r.suppressed {
		if n > 0 {
			by = append(by, slog.Uint64(ResponseFlag(i).String(), n))
		}
	}
	r.suppressed = [numFlags]uint64{}
	r.total = 0
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	r.mu.Unlock()
	if total == 0 {
		return
	}
	r.log.Warn("ztunnel: more refusals not logged", "suppressed", total, slog.Group("by_reason", by...),
		"rate_limit", r.rate)
}
