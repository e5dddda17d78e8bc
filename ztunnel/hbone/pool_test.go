package hbone_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// roundTripStream sends msg on a new stream of pool, reads the echo and
// closes the stream.
func roundTripStream(ctx context.Context, pool *hbone.Pool, req *hbone.Request, msg string) error {
	st, err := pool.Connect(ctx, req)
	if err != nil {
		return err
	}
	defer st.Close()
	if _, err := st.Write([]byte(msg)); err != nil {
		return err
	}
	if err := st.CloseWrite(); err != nil {
		return err
	}
	got, err := io.ReadAll(st)
	if err != nil {
		return err
	}
	if string(got) != msg {
		return errors.New("echo: got " + string(got) + ", want " + msg)
	}
	return nil
}

// A dial that times out fails the stream that started it, not the
// streams that were waiting for it: they dial again.
func TestPoolWaitersSurviveADialThatTimesOut(t *testing.T) {
	tune := hbone.Tuning{HandshakeTimeout: time.Second}
	e := newEnv(t, tune, nil)
	var dials atomic.Int32
	stuck := make(chan struct{})
	pool := hbone.NewPool(hbone.PoolConfig{Tuning: tune, SVID: e.ca.SVID, Bundles: e.ca.Bundles(),
		Dial: func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			if dials.Add(1) == 1 {
				close(stuck)
				<-ctx.Done() // a peer that never answers the SYN
				return nil, ctx.Err()
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", dst.String())
		}})
	t.Cleanup(pool.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	first := make(chan error, 1)
	go func() { first <- roundTripStream(ctx, pool, e.req(nil), "first") }()
	<-stuck
	const waiters = 5
	errs := make(chan error, waiters)
	var wg sync.WaitGroup
	for range waiters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- roundTripStream(ctx, pool, e.req(nil), "waiter")
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			t.Errorf("a stream waiting for the dial that timed out failed: %v", err)
		}
	}
	if err := <-first; err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("the stream whose dial timed out: %v, want a deadline error", err)
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d dials, want 2 (the one that timed out, one for the %d waiters)", n, waiters)
	}
}

// Once a burst of streams is over, the pool keeps one idle connection per
// key and closes the others after SpareIdleTimeout; the one it keeps
// carries the next stream.
func TestPoolClosesSpareIdleConnections(t *testing.T) {
	tune := hbone.Tuning{MaxStreamsPerConn: 1, SpareIdleTimeout: 200 * time.Millisecond, IdleTimeout: time.Minute}
	e := newEnv(t, tune, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const burst = 5
	streams := make([]*hbone.Stream, burst)
	for i := range streams {
		st, err := e.pool.Connect(ctx, e.req(nil))
		if err != nil {
			t.Fatal(err)
		}
		streams[i] = st
	}
	if got := e.pool.Conns(); got != burst {
		t.Fatalf("%d connections for %d streams of one stream each, want %d", got, burst, burst)
	}
	for _, st := range streams {
		if err := st.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadAll(st); err != nil {
			t.Fatal(err)
		}
		st.Close()
	}
	for e.pool.Conns() > 1 {
		if ctx.Err() != nil {
			t.Fatalf("the pool still holds %d idle connections, want 1", e.pool.Conns())
		}
		time.Sleep(20 * time.Millisecond)
	}
	handshakes := e.pool.Stats().Handshakes
	if err := roundTripStream(ctx, e.pool, e.req(nil), "again"); err != nil {
		t.Fatal(err)
	}
	if got := e.pool.Stats().Handshakes; got != handshakes {
		t.Errorf("the next stream made a handshake (%d, was %d), want it on the kept connection", got, handshakes)
	}
	if got := e.pool.Conns(); got != 1 {
		t.Errorf("%d connections, want 1", got)
	}
}

// With SpreadConnsPerKey, streams opened side by side get connections of
// their own up to that many, then share the least loaded: four streams
// over two connections carry two each, and all of them work.
func TestPoolSpreadsStreamsOverConnections(t *testing.T) {
	tune := hbone.Tuning{SpreadConnsPerKey: 2}
	e := newEnv(t, tune, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	perConn := map[*hbone.Conn]int{}
	var streams []*hbone.Stream
	for range 4 {
		st, err := e.pool.Connect(ctx, e.req(nil))
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		streams = append(streams, st)
		perConn[st.Conn]++
	}
	if got := e.pool.Stats().Handshakes; got != 2 || len(perConn) != 2 {
		t.Fatalf("4 streams over %d connections (%d handshakes), want 2", len(perConn), got)
	}
	for _, n := range perConn {
		if n != 2 {
			t.Errorf("a connection carries %d of the 4 streams, want 2", n)
		}
	}
	for i, st := range streams {
		msg := []byte{'a' + byte(i)}
		if _, err := st.Write(msg); err != nil {
			t.Fatal(err)
		}
		if err := st.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(st); err != nil || string(got) != string(msg) {
			t.Fatalf("stream %d echoed %q, %v; want %q", i, got, err, msg)
		}
	}
}

// A dial made only to spread streams never fails a stream: when it fails,
// the stream shares the connection there is.
func TestPoolSpreadDialFailureSharesAConnection(t *testing.T) {
	tune := hbone.Tuning{SpreadConnsPerKey: 4}
	e := newEnv(t, tune, nil)
	var dials atomic.Int32
	pool := hbone.NewPool(hbone.PoolConfig{Tuning: tune, SVID: e.ca.SVID, Bundles: e.ca.Bundles(),
		Dial: func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			if dials.Add(1) > 1 {
				return nil, errors.New("refused by the test")
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", dst.String())
		}})
	t.Cleanup(pool.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first, err := pool.Connect(ctx, e.req(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if err := roundTripStream(ctx, pool, e.req(nil), "second"); err != nil {
		t.Fatalf("the second stream, whose spreading dial failed: %v", err)
	}
	if n, c := dials.Load(), pool.Conns(); n != 2 || c != 1 {
		t.Errorf("%d dials, %d connections; want 2 dials (one failed) and 1 connection", n, c)
	}
}
