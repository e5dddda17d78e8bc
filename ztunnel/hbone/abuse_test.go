package hbone_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// waitFor polls cond every few milliseconds until it holds or 20 s passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// refusedWith reports whether one of errs wraps sentinel.
func refusedWith(errs []error, sentinel error) error {
	for _, err := range errs {
		if errors.Is(err, sentinel) {
			return err
		}
	}
	return nil
}

func TestResetStreamsStayChargedUntilTheirHandlerReturns(t *testing.T) {
	// Resetting a stream does not free its slot while its handler still
	// works (authorizes, dials): new streams beyond the limit are refused
	// before any handler starts.
	const limit = 4
	var started, running atomic.Int32
	release := make(chan struct{})
	e := newRawEnv(t, hbone.Tuning{MaxConcurrentStreams: limit}, func(_ context.Context, s *hbone.Stream) {
		started.Add(1)
		running.Add(1)
		defer running.Add(-1)
		<-release // a handler that does not look at its context
		s.Respond(http.StatusServiceUnavailable)
	})
	rc := e.pipe(nil, nil)
	id := uint32(1)
	for range limit {
		if err := rc.connect(id, false); err != nil {
			t.Fatal(err)
		}
		if err := rc.reset(id); err != nil {
			t.Fatal(err)
		}
		id += 2
	}
	waitFor(t, "the first handlers to start", func() bool { return started.Load() == limit })
	for range 3 {
		if err := rc.connect(id, false); err != nil {
			t.Fatal(err)
		}
		if st, err := rc.status(id); err != nil || st != "RST_STREAM REFUSED_STREAM" {
			t.Fatalf("stream %d beyond the limit: %q, %v; want RST_STREAM REFUSED_STREAM", id, st, err)
		}
		id += 2
	}
	if n := started.Load(); n != limit {
		t.Fatalf("%d handlers started, want %d: reset streams must stay charged", n, limit)
	}
	if refusedWith(e.refusals(), hbone.ErrStreamLimit) == nil {
		t.Fatalf("Refused got %v, want ErrStreamLimit", e.refusals())
	}
	close(release)
	waitFor(t, "the handlers to return", func() bool { return running.Load() == 0 })
	// Their slots are free again (the server may see our next HEADERS a
	// moment before the last handler's end: try a few times).
	waitFor(t, "a new stream to be accepted", func() bool {
		if err := rc.connect(id, false); err != nil {
			t.Fatal(err)
		}
		st, err := rc.status(id)
		id += 2
		return err == nil && st == "503"
	})
}

func TestRapidResetEndsTheConnection(t *testing.T) {
	const burst = 20
	var started, running atomic.Int32
	e := newRawEnv(t, hbone.Tuning{ResetBurst: burst, ResetRate: 1e-3}, func(ctx context.Context, s *hbone.Stream) {
		started.Add(1)
		running.Add(1)
		defer running.Add(-1)
		<-ctx.Done() // a slow dial, which the reset cancels
	})
	rc := e.pipe(nil, nil)
	var err error
	for id := uint32(1); id < 2000 && err == nil; id += 2 {
		if err = rc.connect(id, false); err == nil {
			err = rc.reset(id)
		}
	}
	if err == nil {
		t.Fatal("1,000 streams opened and reset on one connection, want it closed long before")
	}
	g, err := rc.waitClosed()
	if err != nil || g == nil || g.code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %+v (%v), want ENHANCE_YOUR_CALM before the close", g, err)
	}
	rr := refusedWith(e.refusals(), hbone.ErrRapidReset)
	if rr == nil || !strings.Contains(rr.Error(), e.client.String()) {
		t.Fatalf("Refused got %v, want ErrRapidReset naming %s", e.refusals(), e.client)
	}
	if n := started.Load(); n > burst+1 {
		t.Fatalf("%d handlers started, want at most %d", n, burst+1)
	}
	waitFor(t, "every handler to end", func() bool { return running.Load() == 0 })
}

func TestResetsAfterTheAnswerAreNotRapid(t *testing.T) {
	// A client that closes its tunnels early (after the 200) many times in
	// a row is an ordinary client: the limit counts only resets of streams
	// the server had not answered yet.
	const burst = 5
	e := newRawEnv(t, hbone.Tuning{ResetBurst: burst, ResetRate: 1e-3}, func(ctx context.Context, s *hbone.Stream) {
		s.Respond(http.StatusOK)
		<-ctx.Done()
	})
	rc := e.pipe(nil, nil)
	for id := uint32(1); id < 2*10*burst; id += 2 {
		if err := rc.connect(id, false); err != nil {
			t.Fatal(err)
		}
		if st, err := rc.status(id); err != nil || st != "200" {
			t.Fatalf("stream %d: %q, %v; want 200", id, st, err)
		}
		if err := rc.reset(id); err != nil {
			t.Fatal(err)
		}
	}
	if errs := e.refusals(); len(errs) > 0 {
		t.Fatalf("Refused got %v, want nothing", errs)
	}
}

func TestFrameFloodsEndTheConnection(t *testing.T) {
	const burst = 50
	for _, tc := range []struct {
		name  string
		frame func(fr *http2.Framer, i int) error
	}{
		{"PING", func(fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i)}) }},
		{"SETTINGS", func(fr *http2.Framer, i int) error { return fr.WriteSettings() }},
		{"empty DATA", func(fr *http2.Framer, i int) error { return fr.WriteData(1, false, nil) }},
		{"PRIORITY", func(fr *http2.Framer, i int) error {
			return fr.WritePriority(1, http2.PriorityParam{Weight: byte(i)})
		}},
		{"unknown frame type", func(fr *http2.Framer, i int) error { return fr.WriteRawFrame(0xbb, 0, 0, []byte{1}) }},
		{"CONNECT without :authority", func(fr *http2.Framer, i int) error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(3 + 2*i), BlockFragment: []byte{0x82 /* :method GET */}, EndHeaders: true, EndStream: true})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newRawEnv(t, hbone.Tuning{FloodBurst: burst, FloodRate: 1e-3}, func(ctx context.Context, s *hbone.Stream) {
				s.Respond(http.StatusOK)
				<-ctx.Done()
			})
			rc := e.pipe(nil, nil)
			if err := rc.connect(1, false); err != nil {
				t.Fatal(err)
			}
			if st, err := rc.status(1); err != nil || st != "200" {
				t.Fatalf("status %q, %v", st, err)
			}
			var err error
			for i := 0; i < 20*burst && err == nil; i++ {
				err = rc.write(func(fr *http2.Framer) error { return tc.frame(fr, i) })
			}
			if err == nil {
				t.Fatalf("%d frames sent, want the connection closed after about %d", 20*burst, burst)
			}
			g, err := rc.waitClosed()
			if err != nil || g == nil || g.code != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %+v (%v), want ENHANCE_YOUR_CALM", g, err)
			}
			if refusedWith(e.refusals(), hbone.ErrFrameFlood) == nil {
				t.Fatalf("Refused got %v, want ErrFrameFlood", e.refusals())
			}
		})
	}
}

func TestClientThatDoesNotReadItsAnswersIsClosed(t *testing.T) {
	// Answers (here PING acks) queue up while the client does not read;
	// the queue is bounded and the connection closed when it is full.
	e := newRawEnv(t, hbone.Tuning{FloodBurst: 1 << 20, FloodRate: 1 << 20}, nil)
	rc := e.pipe(nil, func(s frameSummary) bool { return s.typ == http2.FrameSettings })
	var err error
	for i := 0; i < 100_000 && err == nil; i++ {
		err = rc.write(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{byte(i)}) })
	}
	if err == nil {
		t.Fatal("100,000 PINGs sent to a server whose answers are not read, want the connection closed")
	}
	waitFor(t, "Refused", func() bool { return refusedWith(e.refusals(), hbone.ErrFrameFlood) != nil })
}
