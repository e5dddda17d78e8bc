package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// AccessLogOptions tune an AccessLog. Zero values take the defaults.
type AccessLogOptions struct {
	// Rate is how many lines per second may be written on average
	// (default 1000); Burst how many at once (default 2×Rate). Lines above
	// the rate are dropped and counted.
	Rate  float64
	Burst int
	// QueueSize bounds the lines waiting for the writer (default 4096); a
	// full queue drops lines rather than slowing connections down.
	QueueSize int
	// SummaryEvery is how often a "dropped N lines" line is written while
	// lines are being dropped (default 1s).
	SummaryEvery time.Duration
}

// AccessLog writes flow events as JSON lines, one per line, from its own
// goroutine (Run). Log never blocks: under a flood, lines beyond the rate
// limit or the queue are dropped, counted, and summed up in a line
// {"event":"dropped","dropped":N,...} at most every SummaryEvery.
type AccessLog struct {
	w       io.Writer
	opts    AccessLogOptions
	lim     *rate.Limiter
	q       chan FlowEvent
	dropped atomic.Uint64 // total
	written atomic.Uint64
	desc    *prometheus.Desc
	wdesc   *prometheus.Desc
}

// NewAccessLog returns an access log writing to w; call Run.
func NewAccessLog(w io.Writer, opts AccessLogOptions) *AccessLog {
	if opts.Rate <= 0 {
		opts.Rate = 1000
	}
	if opts.Burst <= 0 {
		opts.Burst = int(2 * opts.Rate)
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.SummaryEvery <= 0 {
		opts.SummaryEvery = time.Second
	}
	return &AccessLog{
		w: w, opts: opts,
		lim: rate.NewLimiter(rate.Limit(opts.Rate), opts.Burst),
		q:   make(chan FlowEvent, opts.QueueSize),
		desc: prometheus.NewDesc("mantlet_accesslog_dropped_lines_total",
			"Access log lines dropped by the rate limit or a full queue.", nil, nil),
		wdesc: prometheus.NewDesc("mantlet_accesslog_lines_total",
			"Access log lines written.", nil, nil),
	}
}

// Log queues ev for writing, or drops it when over the rate or the queue
// is full. It never blocks.
func (a *AccessLog) Log(ev FlowEvent) {
	if !a.lim.Allow() {
		a.dropped.Add(1)
		return
	}
	select {
	case a.q <- ev:
	default:
		a.dropped.Add(1)
	}
}

// Dropped returns how many lines were dropped so far.
func (a *AccessLog) Dropped() uint64 { return a.dropped.Load() }

// droppedLine is the summary written while lines are dropped.
type droppedLine struct {
	Time    time.Time `json:"time"`
	Event   string    `json:"event"`
	Dropped uint64    `json:"dropped"`
	Msg     string    `json:"msg"`
}

// Run writes queued lines until ctx is done, then writes what is still
// queued and returns. Each line is one write, so lines stay whole when
// the log shares a pipe with other output. A write error is returned (the
// log stops).
func (a *AccessLog) Run(ctx context.Context) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	tick := time.NewTicker(a.opts.SummaryEvery)
	defer tick.Stop()
	var reported uint64
	line := func(v any) error {
		buf.Reset()
		if err := enc.Encode(v); err != nil {
			return fmt.Errorf("access log: encode: %w", err)
		}
		if _, err := a.w.Write(buf.Bytes()); err != nil {
			return fmt.Errorf("access log: write: %w", err)
		}
		return nil
	}
	summary := func() error {
		n := a.dropped.Load()
		if n <= reported {
			return nil
		}
		d := n - reported
		reported = n
		return line(droppedLine{Time: time.Now().UTC(), Event: "dropped", Dropped: d,
			Msg: fmt.Sprintf("access log: dropped %d lines (rate limit %g/s or full queue)", d, a.opts.Rate)})
	}
	write := func(ev *FlowEvent) error {
		if err := line(ev); err != nil {
			return err
		}
		a.written.Add(1)
		return nil
	}
	for {
		select {
		case ev := <-a.q:
			if err := write(&ev); err != nil {
				return err
			}
		case <-tick.C:
			if err := summary(); err != nil {
				return err
			}
		case <-ctx.Done():
			for {
				select {
				case ev := <-a.q:
					if err := write(&ev); err != nil {
						return err
					}
					continue
				default:
				}
				return summary()
			}
		}
	}
}

// Describe implements prometheus.Collector.
func (a *AccessLog) Describe(ch chan<- *prometheus.Desc) {
	ch <- a.desc
	ch <- a.wdesc
}

// Collect implements prometheus.Collector.
func (a *AccessLog) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(a.desc, prometheus.CounterValue, float64(a.dropped.Load()))
	ch <- prometheus.MustNewConstMetric(a.wdesc, prometheus.CounterValue, float64(a.written.Load()))
}
