package events

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// WriterOptions configure a Writer. Zero fields take the defaults.
type WriterOptions struct {
	// Name names the stream in summary lines ("stream") and in the log,
	// e.g. "access_log".
	Name string
	// Node is written into every line as "node".
	Node string
	// Rate bounds the lines accepted per second on average (default
	// 1000), Burst at once (default 2×Rate); a line over the rate is
	// suppressed.
	Rate  float64
	Burst int
	// QueueSize bounds the lines waiting to be written (default 4096); a
	// line that finds the queue full is suppressed.
	QueueSize int
	// SummaryInterval is how often the Writer reports what it lost
	// (default 5s): a summary line counts the lines suppressed since the
	// last report, and one log line the writes that failed. Nothing is
	// reported for an interval that lost nothing; Run reports a last time
	// when it ends.
	SummaryInterval time.Duration
	// Logger receives the reports of failed writes; nil discards them.
	Logger *slog.Logger
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Stats counts the lines given to a Writer.
type Stats struct {
	// Written lines; lines suppressed because they came over the rate
	// (RateLimited) or found the queue full (QueueFull); lines lost
	// because writing them failed (Failed).
	Written, RateLimited, QueueFull, Failed uint64
}

// Writer writes flows as JSON lines to an io.Writer, each line with one
// Write (so lines stay whole when the output is a pipe shared with other
// writers). Emit never blocks: a line over the rate limit or finding the
// queue full is counted and dropped, and a summary line
// ({"kind":"suppressed",...}) says how many. A failed write loses its
// line, is counted and logged, and writing goes on: the output never
// stops the data path, nor the agent. Run does the writing.
type Writer struct {
	out  io.Writer
	opts WriterOptions
	q    chan *Flow // copies from flowPool, back there once written
	lim  *rate.Limiter

	written, rateLimited, queueFull, failed atomic.Uint64
}

var _ Sink = (*Writer)(nil)

// flowPool holds the copies of flows that wait in Writers' queues. A
// queue of pointers holds only the lines waiting: a queue of 4,096 Flow
// values would keep 1.9 MB resident once traffic had gone through it,
// whether lines wait or not.
var flowPool = sync.Pool{New: func() any { return new(Flow) }}

// NewWriter returns a Writer to out; call Run (once) to write.
func NewWriter(out io.Writer, opts WriterOptions) *Writer {
	if opts.Rate <= 0 {
		opts.Rate = 1000
	}
	if opts.Burst <= 0 {
		opts.Burst = int(2 * opts.Rate)
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.SummaryInterval <= 0 {
		opts.SummaryInterval = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Writer{out: out, opts: opts, q: make(chan *Flow, opts.QueueSize),
		lim: rate.NewLimiter(rate.Limit(opts.Rate), opts.Burst)}
}

// Emit queues a copy of f for writing, or counts it as suppressed. It
// never blocks and does not allocate.
func (w *Writer) Emit(f *Flow) {
	if !w.lim.AllowN(w.opts.Now(), 1) {
		w.rateLimited.Add(1)
		return
	}
	c := flowPool.Get().(*Flow)
	*c = *f
	select {
	case w.q <- c:
	default:
		*c = Flow{}
		flowPool.Put(c)
		w.queueFull.Add(1)
	}
}

// Stats returns the counts so far.
func (w *Writer) Stats() Stats {
	return Stats{Written: w.written.Load(), RateLimited: w.rateLimited.Load(),
		QueueFull: w.queueFull.Load(), Failed: w.failed.Load()}
}

// Run writes queued lines and the reports until ctx ends, then writes
// what is still queued, reports a last time and returns.
func (w *Writer) Run(ctx context.Context) {
	tick := time.NewTicker(w.opts.SummaryInterval)
	defer tick.Stop()
	var (
		buf      []byte
		reported Stats // the counts at the last report
		since    = w.opts.Now()
		lastErr  error
	)
	write := func(f *Flow) {
		if f.Node == "" {
			f.Node = w.opts.Node
		}
		buf = append(f.Append(buf[:0]), '\n')
		*f = Flow{}
		flowPool.Put(f)
		if _, err := w.out.Write(buf); err != nil {
			w.failed.Add(1)
			lastErr = err
			return
		}
		w.written.Add(1)
	}
	report := func() {
		now, s := w.opts.Now(), w.Stats()
		if rl, qf := s.RateLimited-reported.RateLimited, s.QueueFull-reported.QueueFull; rl+qf > 0 {
			buf = append(appendSummary(buf[:0], now, since, w.opts.Node, w.opts.Name, rl, qf), '\n')
			if _, err := w.out.Write(buf); err != nil {
				lastErr = err
			}
		}
		if n := s.Failed - reported.Failed; n > 0 || lastErr != nil {
			w.opts.Logger.Warn("events: write failed; lines lost", "stream", w.opts.Name, "lines", n, "error", lastErr)
		}
		reported, since, lastErr = s, now, nil
	}
	for {
		select {
		case f := <-w.q:
			write(f)
		case <-tick.C:
			report()
		case <-ctx.Done():
			for {
				select {
				case f := <-w.q:
					write(f)
					continue
				default:
				}
				report()
				return
			}
		}
	}
}

// NewCollector exports w's Stats as the counter name, with the label
// result: "written", "rate_limited", "queue_full" or "failed".
func NewCollector(w *Writer, name, help string) prometheus.Collector {
	return &collector{w: w, desc: prometheus.NewDesc(name, help, []string{"result"}, nil)}
}

type collector struct {
	w    *Writer
	desc *prometheus.Desc
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.w.Stats()
	for _, r := range []struct {
		n      uint64
		result string
	}{{s.Written, "written"}, {s.RateLimited, "rate_limited"}, {s.QueueFull, "queue_full"}, {s.Failed, "failed"}} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(r.n), r.result)
	}
}
