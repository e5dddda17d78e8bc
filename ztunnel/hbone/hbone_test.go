package hbone_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// env is an HBONE server on loopback whose handler echoes, and a pool.
type env struct {
	ca      *ztest.CA
	srv     *hbone.Server
	ln      net.Listener
	addr    netip.AddrPort
	pool    *hbone.Pool
	client  spiffeid.ID
	server  spiffeid.ID
	mu      sync.Mutex
	refused []error
	peers   []spiffeid.ID
}

func newEnv(t *testing.T, tune hbone.Tuning, handler func(ctx context.Context, s *hbone.Stream)) *env {
	t.Helper()
	e := &env{ca: ztest.NewCA(t, "cluster.local", ca.Options{})}
	e.client = e.ca.ID("shop", "frontend")
	e.server = e.ca.ID("shop", "checkout")
	if handler == nil {
		handler = echo
	}
	e.srv = &hbone.Server{
		Tuning: tune,
		Handler: func(ctx context.Context, s *hbone.Stream) {
			e.mu.Lock()
			e.peers = append(e.peers, s.Conn.PeerID)
			e.mu.Unlock()
			handler(ctx, s)
		},
		Refused: func(_ *hbone.Conn, err error) {
			e.mu.Lock()
			e.refused = append(e.refused, err)
			e.mu.Unlock()
		},
	}
	cfg := hbone.ServerConfig(func(ctx context.Context, _ netip.Addr) (*x509svid.SVID, error) {
		return e.ca.SVID(ctx, e.server)
	}, e.ca.Bundles())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.ln = ln
	e.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				tc := tls.Server(c, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					return
				}
				e.srv.ServeConn(ctx, tc)
			}()
		}
	}()
	e.pool = hbone.NewPool(hbone.PoolConfig{Tuning: tune, SVID: e.ca.SVID, Bundles: e.ca.Bundles()})
	t.Cleanup(func() {
		e.pool.Close()
		ln.Close()
		e.srv.Close()
		cancel()
		wg.Wait()
	})
	return e
}

func (e *env) req(body io.Reader) *hbone.Request {
	return &hbone.Request{
		Key:    hbone.Key{Src: e.client, Dst: e.server, DstIP: e.addr.Addr()},
		Addr:   e.addr,
		Target: netip.AddrPortFrom(e.addr.Addr(), 8080),
		Body:   body,
	}
}

// echo answers 200 and sends back what it reads, then half-closes.
func echo(_ context.Context, s *hbone.Stream) {
	if err := s.Respond(http.StatusOK); err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	if _, err := io.CopyBuffer(s, s, buf); err != nil {
		return
	}
	s.CloseWrite()
}

func TestEchoThroughTunnel(t *testing.T) {
	e := newEnv(t, hbone.Tuning{}, nil)
	for _, size := range []int{0, 1, 100 << 10, 8 << 20} {
		data := make([]byte, size)
		rand.Read(data)
		cs, err := e.pool.Connect(t.Context(), e.req(bytes.NewReader(data)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(cs)
		cs.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("size %d: got %d bytes (err %v), want them echoed", size, len(got), err)
		}
	}
	if s := e.pool.Stats(); s.Handshakes != 1 || s.Streams != 4 {
		t.Fatalf("stats = %+v, want 1 handshake for 4 streams", s)
	}
}

// A pool cancels at most a connection's streams before their answers at
// once; the server's rapid-reset burst must allow that many, whatever the
// streams per connection are set to (a server of the same tuning).
func TestRapidResetBurstCoversAConnectionsStreams(t *testing.T) {
	for _, streams := range []int{0, 50, 200, 300, 1000} {
		tune := hbone.Tuning{MaxStreamsPerConn: streams}.WithDefaults()
		if tune.ResetBurst < tune.MaxStreamsPerConn {
			t.Errorf("MaxStreamsPerConn %d: ResetBurst %d, want at least %d", streams, tune.ResetBurst, tune.MaxStreamsPerConn)
		}
	}
	if set := (hbone.Tuning{MaxStreamsPerConn: 300, ResetBurst: 10}).WithDefaults().ResetBurst; set != 10 {
		t.Errorf("ResetBurst set to 10 became %d", set)
	}
}

func TestSmallStreamWindowTakesHTTP2sInitialWindow(t *testing.T) {
	// A client may send 65,535 bytes on a new stream before it has read
	// the server's SETTINGS; a smaller window would reset the stream with
	// FLOW_CONTROL_ERROR. So windows below that are raised to it.
	if got := (hbone.Tuning{StreamWindow: 16 << 10}).WithDefaults().StreamWindow; got != 65535 {
		t.Fatalf("StreamWindow 16 KiB became %d, want 65535", got)
	}
	e := newEnv(t, hbone.Tuning{StreamWindow: 16 << 10, ConnWindow: 64 << 10, MaxFrameSize: 16 << 10}, nil)
	data := make([]byte, 1<<20)
	rand.Read(data)
	cs, err := e.pool.Connect(t.Context(), e.req(bytes.NewReader(data)))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	got, err := io.ReadAll(cs)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes (err %v), want 1 MiB echoed", len(got), err)
	}
}

func TestServerHalfCloseKeepsClientSending(t *testing.T) {
	// The server half-closes first; the client then still sends, and the
	// server receives it: half-close is independent in both directions.
	got := make(chan []byte, 1)
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		s.Respond(http.StatusOK)
		s.Write([]byte("bye"))
		s.CloseWrite()
		b, _ := io.ReadAll(s)
		got <- b
	})
	pr, pw := io.Pipe()
	cs, err := e.pool.Connect(t.Context(), e.req(pr))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	b, err := io.ReadAll(cs)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v; want \"bye\", EOF", b, err)
	}
	pw.Write([]byte("after your EOF"))
	pw.Close()
	select {
	case b := <-got:
		if string(b) != "after your EOF" {
			t.Fatalf("server got %q", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server did not receive data sent after its half-close")
	}
}

func TestRefusedStatusReachesClient(t *testing.T) {
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) { s.Respond(http.StatusUnauthorized) })
	_, err := e.pool.Connect(t.Context(), e.req(bytes.NewReader(nil)))
	var re *hbone.RefusedError
	if !errors.As(err, &re) || re.Status != 401 || !errors.Is(err, hbone.ErrRefused) {
		t.Fatalf("err = %v, want a 401 RefusedError", err)
	}
}

// TestConnectionsBoundToAPodCarryOnlyThatPodsStreams: two client pods of
// one identity (a pod deleted and created again with a new address) never
// share a connection bound to the other's address: the replies to a
// deleted pod's address no longer reach the ztunnel.
func TestConnectionsBoundToAPodCarryOnlyThatPodsStreams(t *testing.T) {
	e := newEnv(t, hbone.Tuning{}, nil)
	for i, src := range []string{"127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"} {
		req := e.req(bytes.NewReader([]byte("ping")))
		req.BindSrc = netip.MustParseAddr(src)
		cs, err := e.pool.Connect(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(cs)
		cs.Close()
		if err != nil || string(got) != "ping" {
			t.Fatalf("stream %d from %s: got %q (err %v), want ping", i, src, got, err)
		}
	}
	if s := e.pool.Stats(); s.Handshakes != 2 || s.Streams != 4 {
		t.Fatalf("stats = %+v, want 2 handshakes (one per bound address) for 4 streams", s)
	}
	if n := e.pool.Conns(); n != 2 {
		t.Fatalf("%d pooled connections, want 2", n)
	}
}

// A handler that detaches its stream returns at once; the stream keeps
// carrying data until its done is called, which ends it as the handler's
// return would have.
func TestADetachedStreamOutlivesItsHandlerUntilDone(t *testing.T) {
	dones := make(chan func(), 1)
	returned := make(chan struct{}, 1)
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		if err := s.Respond(http.StatusOK); err != nil {
			return
		}
		dones <- s.Detach()
		go func() {
			buf := make([]byte, 1024)
			n, _ := s.Read(buf)
			s.Write(buf[:n])
		}()
		returned <- struct{}{}
	})
	pr, pw := io.Pipe()
	defer pw.Close()
	cs, err := e.pool.Connect(t.Context(), e.req(pr))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	done := <-dones
	<-returned
	if _, err := pw.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(cs, got); err != nil || string(got) != "ping" {
		t.Fatalf("after the handler returned, read %q (%v), want the echo of ping", got, err)
	}
	// The stream stays open until done: a read waits.
	read := make(chan error, 1)
	go func() {
		_, err := cs.Read(got)
		read <- err
	}()
	select {
	case err := <-read:
		t.Fatalf("before done, the read ended (%v), want it to wait", err)
	case <-time.After(100 * time.Millisecond):
	}
	done()
	if err := <-read; err == nil {
		t.Fatal("after done, the read got data, want the stream ended")
	}
}
