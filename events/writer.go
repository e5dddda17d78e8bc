package events

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// WriterOptions configure a Writer. The zero value gives the defaults.
type WriterOptions struct {
	// QueueSize bounds the events waiting to be written (default 4096).
	// An event that finds the queue full is suppressed.
	QueueSize int
	// Rate and Burst bound the events accepted per second (default 1000
	// and 2000). An event over the rate is suppressed.
	Rate  float64
	Burst int
	// SummaryInterval is how often, while events are being suppressed, a
	// summary line counts them (default 10s). A last summary is written
	// when Run ends.
	SummaryInterval time.Duration
	// Logger receives write errors (at most one per SummaryInterval);
	// nil discards.
	Logger *slog.Logger
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Stats counts a Writer's events.
type Stats struct {
	// Written events, Suppressed ones (over the rate or queue full).
	Written, Suppressed uint64
}

// Writer writes events as JSON lines to an io.Writer. Emit never blocks:
// an event beyond the rate limit or finding the queue full is counted and
// dropped, and a summary line ({"kind":"events_suppressed",...}) says how
// many were dropped. Run does the writing.
type Writer struct {
	out  *bufio.Writer
	opts WriterOptions
	q    chan Event
	lim  *rate.Limiter

	written, suppressed atomic.Uint64
	reported            uint64 // suppressed count in the last summary; Run's goroutine only
	since               time.Time
	runOnce             sync.Once
}

// NewWriter returns a Writer to w; call Run to write.
func NewWriter(w io.Writer, opts WriterOptions) *Writer {
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.Rate <= 0 {
		opts.Rate = 1000
	}
	if opts.Burst <= 0 {
		opts.Burst = 2 * int(opts.Rate)
	}
	if opts.SummaryInterval <= 0 {
		opts.SummaryInterval = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Writer{
		out:   bufio.NewWriterSize(w, 64<<10),
		opts:  opts,
		q:     make(chan Event, opts.QueueSize),
		lim:   rate.NewLimiter(rate.Limit(opts.Rate), opts.Burst),
		since: opts.Now(),
	}
}

// Emit queues e for writing, or counts it as suppressed. It never blocks
// and does not allocate.
func (w *Writer) Emit(e *Event) {
	if !w.lim.AllowN(w.opts.Now(), 1) {
		w.suppressed.Add(1)
		return
	}
	select {
	case w.q <- *e:
	default:
		w.suppressed.Add(1)
	}
}

// Stats returns the counts so far.
func (w *Writer) Stats() Stats {
	return Stats{Written: w.written.Load(), Suppressed: w.suppressed.Load()}
}

// Run writes queued events until ctx ends, then writes what is still
// queued and a last summary, flushes, and returns. It returns the first
// write error, if any; writing goes on after errors (they are logged).
func (w *Writer) Run(ctx context.Context) error {
	var first error
	w.runOnce.Do(func() { first = w.run(ctx) })
	return first
}

func (w *Writer) run(ctx context.Context) error {
	tick := time.NewTicker(w.opts.SummaryInterval)
	defer tick.Stop()
	var first error
	var lastLog time.Time
	fail := func(err error) {
		if err == nil {
			return
		}
		if first == nil {
			first = err
		}
		if now := w.opts.Now(); now.Sub(lastLog) >= w.opts.SummaryInterval {
			lastLog = now
			w.opts.Logger.Warn("events: write failed", "error", err)
		}
	}
	var buf []byte
	write := func(e *Event) {
		buf = e.Append(buf[:0])
		buf = append(buf, '\n')
		if _, err := w.out.Write(buf); err != nil {
			fail(err)
			return
		}
		w.written.Add(1)
	}
	for {
		select {
		case e := <-w.q:
			write(&e)
			// Flush when the queue is drained: lines appear promptly,
			// bursts are written in large chunks.
			if len(w.q) == 0 {
				fail(w.out.Flush())
			}
		case <-tick.C:
			fail(w.summary())
		case <-ctx.Done():
			for {
				select {
				case e := <-w.q:
					write(&e)
					continue
				default:
				}
				break
			}
			fail(w.summary())
			fail(w.out.Flush())
			if first != nil {
				return fmt.Errorf("events: write: %w", first)
			}
			return nil
		}
	}
}

// summary writes how many events were suppressed since the last summary,
// if any were.
func (w *Writer) summary() error {
	now := w.opts.Now()
	total := w.suppressed.Load()
	n := total - w.reported
	if n == 0 {
		w.since = now
		return nil
	}
	w.reported = total
	line := fmt.Appendf(nil, `{"time":%q,"kind":"events_suppressed","suppressed":%d,"since":%q}`+"\n",
		now.UTC().Format(time.RFC3339Nano), n, w.since.UTC().Format(time.RFC3339Nano))
	w.since = now
	if _, err := w.out.Write(line); err != nil {
		return err
	}
	return w.out.Flush()
}

// Append appends e's JSON form (one object, no newline) to b:
//
//	{"time":"2026-11-25T21:30:00.123Z","kind":"security_event","verdict":"deny",
//	 "stage":"connect","reason":"denied-by-policy","flag":"policy_denied",
//	 "policy":{"namespace":"shop","name":"payments-allow","rule":0},
//	 "node":"node-b","direction":"inbound","mtls":true,
//	 "source":{"identity":"spiffe://cluster.local/ns/shop/sa/frontend",
//	   "ip":"198.19.1.2","port":40312,"workload":"frontend-0","namespace":"shop"},
//	 "destination":{"identity":"spiffe://cluster.local/ns/shop/sa/payments",
//	   "ip":"198.19.2.3","port":8443,"workload":"payments-0","namespace":"shop"}}
func (e *Event) Append(b []byte) []byte {
	b = append(b, `{"time":`...)
	b = appendString(b, e.Time.UTC().Format(time.RFC3339Nano))
	b = append(b, `,"kind":"security_event","verdict":`...)
	b = appendString(b, string(e.Verdict))
	b = appendField(b, "stage", string(e.Stage))
	b = appendField(b, "reason", e.Reason)
	b = appendField(b, "flag", e.Flag)
	if e.PolicyName != "" {
		b = append(b, `,"policy":{"namespace":`...)
		b = appendString(b, e.PolicyNamespace)
		b = append(b, `,"name":`...)
		b = appendString(b, e.PolicyName)
		b = append(b, `,"rule":`...)
		b = strconv.AppendInt(b, int64(e.Rule), 10)
		b = append(b, '}')
	}
	b = appendField(b, "node", e.Node)
	b = appendField(b, "direction", e.Direction)
	b = append(b, `,"mtls":`...)
	b = strconv.AppendBool(b, e.MTLS)
	b = append(b, `,"source":`...)
	b = appendEnd(b, e.SrcID, e.Src, e.SrcWorkload, e.SrcNamespace)
	b = append(b, `,"destination":`...)
	b = appendEnd(b, e.DstID, e.Dst, e.DstWorkload, e.DstNamespace)
	return append(b, '}')
}

// MarshalJSON returns Append's form.
func (e *Event) MarshalJSON() ([]byte, error) { return e.Append(nil), nil }

func appendEnd(b []byte, id string, ap netip.AddrPort, name, ns string) []byte {
	b = append(b, '{')
	sep := func() {
		if b[len(b)-1] != '{' {
			b = append(b, ',')
		}
	}
	field := func(k, v string) {
		if v == "" {
			return
		}
		sep()
		b = append(b, '"')
		b = append(b, k...)
		b = append(b, `":`...)
		b = appendString(b, v)
	}
	field("identity", id)
	if ap.IsValid() {
		sep()
		b = append(b, `"ip":"`...)
		b = ap.Addr().AppendTo(b)
		b = append(b, `","port":`...)
		b = strconv.AppendUint(b, uint64(ap.Port()), 10)
	}
	field("workload", name)
	field("namespace", ns)
	return append(b, '}')
}

func appendField(b []byte, k, v string) []byte {
	if v == "" {
		return b
	}
	b = append(b, ',')
	b = appendString(b, k)
	b = append(b, ':')
	return appendString(b, v)
}

// appendString appends s as a JSON string.
func appendString(b []byte, s string) []byte {
	// json.Marshal of a string never fails; the common case (no special
	// characters) is appended directly.
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == '"' || c == '\\' || c >= 0x7f {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// OpenFile opens path for appending events (created 0600 if absent); "-"
// is standard error.
func OpenFile(path string) (io.WriteCloser, error) {
	if path == "-" {
		return nopCloser{os.Stderr}, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("events: open %s: %w", path, err)
	}
	return f, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }
