// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// roundTrip sends data on c, half-closes, and returns what came back.
func roundTrip(t *testing.T, c *net.TCPConn, data []byte) []byte {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	return got
}

func TestRoutesEachDestinationKind(t *testing.T) {
	m := newMesh(t, meshOpts{})
	a := m.nodes["node-a"]
	for _, tc := range []struct {
		name     string
		dst      netip.AddrPort
		wantPath ztunnel.Path
		wantDst  netip.AddrPort
		wantMTLS bool
	}{
		{"a pod on another node goes over HBONE", m.appAddr(ipB1), ztunnel.PathHBONE, m.appAddr(ipB1), true},
		{"a service VIP is resolved to its endpoint", netip.AddrPortFrom(ipVIP, 80), ztunnel.PathHBONE, m.appAddr(ipB1), true},
		{"a pod on the same node is reached directly", m.appAddr(ipA2), ztunnel.PathLocal, m.appAddr(ipA2), true},
		{"an address outside the mesh gets plaintext", m.appAddr(ipOutside), ztunnel.PathPassthrough, m.appAddr(ipOutside), false},
		{"a pod that is not enrolled gets plaintext", m.appAddr(ipUnmesh), ztunnel.PathPassthrough, m.appAddr(ipUnmesh), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := m.mustDial(ipA1, tc.dst)
			if got := roundTrip(t, c, []byte("hello "+tc.name)); string(got) != "hello "+tc.name {
				t.Fatalf("echo = %q", got)
			}
			r := a.flow(t)
			if r.Flag != ztunnel.FlagNone || r.Path != tc.wantPath || r.Dst != tc.wantDst || r.MTLS != tc.wantMTLS {
				t.Fatalf("flow = path %s dst %s mtls %v flag %s (%v); want %s %s %v", r.Path, r.Dst, r.MTLS, r.Flag, r.Err, tc.wantPath, tc.wantDst, tc.wantMTLS)
			}
			if r.SrcID != m.id("frontend") || r.Sent != int64(len("hello "+tc.name)) || r.Received != r.Sent {
				t.Fatalf("flow src %s sent %d received %d", r.SrcID, r.Sent, r.Received)
			}
			if tc.wantPath == ztunnel.PathHBONE {
				in := m.nodes["node-b"].flow(t)
				if in.SrcID != m.id("frontend") || in.DstID != m.id("checkout") || in.Src.Addr() != ipA1 {
					t.Fatalf("inbound flow: src %s (%s) dst %s", in.SrcID, in.Src, in.DstID)
				}
			}
		})
	}
}

// prng is a deterministic byte stream.
type prng struct{ r *rand.ChaCha8 }

func (p prng) Read(b []byte) (int, error) { return p.r.Read(b) }

func TestBytesIntactBothWays(t *testing.T) {
	m := newMesh(t, meshOpts{})
	sizes := []int64{0, 1, 16<<10 + 1, 3 << 20}
	if !testing.Short() {
		sizes = append(sizes, 1<<30)
	}
	for _, size := range sizes {
		c := m.mustDial(ipA1, m.appAddr(ipB1))
		var seed [32]byte
		seed[0] = byte(size)
		sent := sha256.New()
		errc := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.MultiWriter(c, sent), io.LimitReader(prng{rand.NewChaCha8(seed)}, size))
			if err == nil {
				err = c.CloseWrite()
			}
			errc <- err
		}()
		got := sha256.New()
		n, err := io.Copy(got, c)
		if err != nil {
			t.Fatalf("%d bytes: read: %v", size, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%d bytes: write: %v", size, err)
		}
		if n != size || !bytes.Equal(got.Sum(nil), sent.Sum(nil)) {
			t.Fatalf("%d bytes sent, %d came back, digests equal: %v", size, n, bytes.Equal(got.Sum(nil), sent.Sum(nil)))
		}
		if r := m.nodes["node-a"].flow(t); r.Sent != size || r.Received != size {
			t.Fatalf("flow counted sent %d received %d, want %d", r.Sent, r.Received, size)
		}
	}
}

func TestHalfCloseBothWays(t *testing.T) {
	m := newMesh(t, meshOpts{})
	b1 := m.apps[ipB1]
	t.Run("client half-closes first, then reads the answer", func(t *testing.T) {
		c := m.mustDial(ipA1, m.appAddr(ipB1))
		if got := roundTrip(t, c, []byte("question")); string(got) != "question" {
			t.Fatalf("got %q", got)
		}
	})
	t.Run("server half-closes first, the client still sends", func(t *testing.T) {
		got := make(chan string, 1)
		b1.setHandler(func(c *net.TCPConn) {
			c.Write([]byte("greeting"))
			c.CloseWrite()
			b, _ := io.ReadAll(c)
			got <- string(b)
		})
		defer b1.setHandler(nil)
		c := m.mustDial(ipA1, m.appAddr(ipB1))
		b, err := io.ReadAll(c) // EOF arrives while our side is still open
		if err != nil || string(b) != "greeting" {
			t.Fatalf("read %q, %v", b, err)
		}
		c.Write([]byte("late reply"))
		c.CloseWrite()
		select {
		case s := <-got:
			if s != "late reply" {
				t.Fatalf("server got %q", s)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("server never got the bytes sent after its half-close")
		}
	})
}

func TestThousandConcurrentStreams(t *testing.T) {
	m := newMesh(t, meshOpts{})
	const n = 1000
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := m.dial(ipA1, m.appAddr(ipB1))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			msg := bytes.Repeat([]byte{byte(i)}, 1024)
			go func() { c.Write(msg); c.CloseWrite() }()
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- err
				if err == nil {
					errs <- io.ErrUnexpectedEOF
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		if failed < 5 {
			t.Errorf("stream failed: %v", err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d streams failed", failed, n)
	}
	st := m.nodes["node-a"].p.PoolStats()
	if st.Streams != n || st.Handshakes > n/100+2 {
		t.Fatalf("pool: %d streams over %d handshakes; want %d streams over about %d", st.Streams, st.Handshakes, n, n/100)
	}
}

func TestPoolReusesOneConnection(t *testing.T) {
	m := newMesh(t, meshOpts{})
	for range 50 {
		c := m.mustDial(ipA1, m.appAddr(ipB1))
		if got := roundTrip(t, c, []byte("x")); string(got) != "x" {
			t.Fatalf("got %q", got)
		}
		c.Close()
	}
	if st := m.nodes["node-a"].p.PoolStats(); st.Handshakes != 1 || st.Streams != 50 {
		t.Fatalf("pool stats %+v, want 50 streams over 1 TLS handshake", st)
	}
	// Another source identity gets its own connection.
	c := m.mustDial(ipA2, m.appAddr(ipB1))
	roundTrip(t, c, []byte("y"))
	if st := m.nodes["node-a"].p.PoolStats(); st.Handshakes != 2 {
		t.Fatalf("handshakes = %d after a second source identity, want 2", st.Handshakes)
	}
}

func TestIdleConnectionsClose(t *testing.T) {
	var o meshOpts
	o.tuning.Tuning = hbone.Tuning{IdleTimeout: 100 * time.Millisecond}
	m := newMesh(t, o)
	roundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("x"))
	deadline := time.Now().Add(5 * time.Second)
	for m.nodes["node-a"].p.PoolStats().Handshakes != 1 || poolConns(m) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("idle pooled connection still open after %v", 5*time.Second)
		}
		time.Sleep(10 * time.Millisecond)
	}
	roundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("y"))
	if st := m.nodes["node-a"].p.PoolStats(); st.Handshakes != 2 {
		t.Fatalf("handshakes = %d, want a fresh one after idle close", st.Handshakes)
	}
}

func poolConns(m *mesh) int { return m.nodes["node-a"].p.PoolConns() }

func TestNoGoroutineLeaks(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Run("traffic", func(t *testing.T) {
		m := newMesh(t, meshOpts{})
		for _, dst := range []netip.AddrPort{m.appAddr(ipB1), m.appAddr(ipA2), m.appAddr(ipOutside)} {
			for range 20 {
				roundTrip(t, m.mustDial(ipA1, dst), bytes.Repeat([]byte("z"), 100<<10))
			}
		}
		// An abandoned connection, open while the mesh shuts down.
		c := m.mustDial(ipA1, m.appAddr(ipB1))
		c.Write([]byte("never finished"))
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		after := runtime.NumGoroutine()
		if after <= before {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, after, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}
