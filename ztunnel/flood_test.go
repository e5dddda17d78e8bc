//go:build linux

package ztunnel_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// logCounter is a slog.Handler that counts the records of each message
// (Info and above).
type logCounter struct {
	mu   sync.Mutex
	msgs map[string]int
	last map[string]slog.Record
}

func newLogCounter() *logCounter {
	return &logCounter{msgs: map[string]int{}, last: map[string]slog.Record{}}
}

func (l *logCounter) Enabled(_ context.Context, level slog.Level) bool {
	return level >= slog.LevelInfo
}
func (l *logCounter) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.msgs[r.Message]++
	l.last[r.Message] = r.Clone()
	l.mu.Unlock()
	return nil
}
func (l *logCounter) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logCounter) WithGroup(string) slog.Handler      { return l }

func (l *logCounter) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.msgs[msg]
}

// attr returns the value of key in the last record of msg.
func (l *logCounter) attr(msg, key string) (slog.Value, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r, ok := l.last[msg]
	if !ok {
		return slog.Value{}, false
	}
	var v slog.Value
	found := false
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == key {
			v, found = a.Value, true
			return false
		}
		return true
	})
	return v, found
}

// flooder holds idle TCP connections to an address from several source
// IPs, as someone without a certificate can: every worker opens one
// connection, waits until the server closes it and opens the next, at
// most one attempt per tick of a shared pace, until the attempts are used
// up or the flood is stopped.
type flooder struct {
	attempts, accepted atomic.Int64
	cancel             context.CancelFunc
	wg                 sync.WaitGroup
	mu                 sync.Mutex
	conns              map[net.Conn]struct{}
}

func startFlood(t *testing.T, srcs []netip.Addr, workersPerSrc int, dst netip.AddrPort, maxAttempts int64, pace time.Duration) *flooder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &flooder{cancel: cancel, conns: map[net.Conn]struct{}{}}
	tick := time.NewTicker(pace)
	for _, src := range srcs {
		for range workersPerSrc {
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				d := bindDialer(src)
				d.Timeout = 2 * time.Second
				for f.attempts.Add(1) <= maxAttempts {
					select {
					case <-tick.C:
					case <-ctx.Done():
						return
					}
					c, err := d.DialContext(ctx, "tcp4", dst.String())
					if err != nil {
						continue
					}
					f.accepted.Add(1)
					f.mu.Lock()
					if ctx.Err() != nil {
						f.mu.Unlock()
						c.Close()
						return
					}
					f.conns[c] = struct{}{}
					f.mu.Unlock()
					_, _ = c.Read(make([]byte, 1)) // until the server (or stop) closes it
					f.mu.Lock()
					delete(f.conns, c)
					f.mu.Unlock()
					c.Close()
				}
			}()
		}
	}
	t.Cleanup(func() { f.stop(); tick.Stop() })
	return f
}

// stop ends the flood and closes its connections.
func (f *flooder) stop() {
	f.cancel()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// floodIPs returns n loopback addresses outside the in-process mesh's.
func floodIPs(n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{127, 0, 9, byte(1 + i)})
	}
	return out
}

// freshConnect opens a new HBONE connection (its own TLS handshake) from
// pod a1 to b1's app and echoes a message through it.
func freshConnect(ctx context.Context, m *mesh, svid *x509svid.SVID) error {
	p := hbone.NewPool(hbone.PoolConfig{
		SVID:    func(context.Context, spiffeid.ID) (*x509svid.SVID, error) { return svid, nil },
		Bundles: m.ca.Bundles(),
	})
	defer p.Close()
	cs, err := p.Connect(ctx, m.hboneTo(svid.ID, m.appAddr(ipB1), strings.NewReader("ping")))
	if err != nil {
		return err
	}
	defer cs.Close()
	got, err := io.ReadAll(cs)
	if err != nil {
		return err
	}
	if string(got) != "ping" {
		return fmt.Errorf("echo %q", got)
	}
	return nil
}

// waitFor polls cond until it holds or 10 s passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestIdleHandshakesEndAtTheDeadline opens idle connections to the HBONE
// port: each is closed once the handshake timeout has passed since it
// arrived, counted as tls_handshake_timeout, and gives its place back.
func TestIdleHandshakesEndAtTheDeadline(t *testing.T) {
	var o meshOpts
	o.tuning.Tuning.HandshakeTimeout = 300 * time.Millisecond
	m := newMesh(t, o)
	b := m.nodes["node-b"]
	var conns []net.Conn
	for _, src := range floodIPs(5) {
		c, err := bindDialer(src).Dial("tcp4", netip.AddrPortFrom(ipB1, b.hbone).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	start := time.Now()
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || isTimeoutErr(err) {
			t.Fatalf("idle connection %d: read %v; want it closed by the server", i, err)
		}
	}
	if waited := time.Since(start); waited < 250*time.Millisecond {
		t.Errorf("the idle connections were closed after %v, before the handshake timeout", waited)
	}
	b.waitCount(t, ztunnel.FlagHandshakeTimeout, 5)
	waitFor(t, "no handshake is pending", func() bool { return b.p.Admission().PendingHandshakes == 0 })
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestHandshakeFloodLeavesFreshHandshakesAlone floods node-b's HBONE port
// with idle connections from eight source IPs, more than the pending
// limit and more than each source's own: new HBONE connections of a
// legitimate peer, each with its own TLS handshake, keep succeeding, the
// pending handshakes never exceed the limit, refusals are counted, and
// their log lines stay within the rate limit.
func TestHandshakeFloodLeavesFreshHandshakesAlone(t *testing.T) {
	logs := newLogCounter()
	var o meshOpts
	o.tuning.Limits = ztunnel.Limits{MaxPendingHandshakes: 64, MaxPendingPerIP: 16, RefusalLogRate: 5}
	o.logger = slog.New(logs)
	m := newMesh(t, o)
	b := m.nodes["node-b"]
	svid := mustMint(t, m.ca, m.id("frontend"), time.Hour)
	start := time.Now()
	// 8 sources x 24 workers: each source tries to hold more than its 16,
	// all together three times the 64. At most 5000 attempts, 1 per 200 µs.
	f := startFlood(t, floodIPs(8), 24, netip.AddrPortFrom(ipB1, b.hbone), 5000, 200*time.Microsecond)
	waitFor(t, "the flood fills the pending handshakes", func() bool {
		return b.p.Rejected(ztunnel.FlagPendingLimit) > 0 && b.p.Rejected(ztunnel.FlagSourceLimit) > 0
	})

	const attempts = 40
	failed := 0
	maxPending := 0
	for i := range attempts {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := freshConnect(ctx, m, svid); err != nil {
			failed++
			t.Logf("attempt %d: %v", i, err)
		}
		cancel()
		maxPending = max(maxPending, b.p.Admission().PendingHandshakes)
	}
	held := f.accepted.Load()
	f.stop()
	// The lines are counted before the time is taken: every line counted
	// was written within elapsed (the flood runs until stop returns).
	lines := logs.count("ztunnel: refused")
	elapsed := time.Since(start)
	st := b.p.Admission()
	t.Logf("flood: %d attempts, %d connected; legitimate: %d of %d failed; pending at most %d (limit 64) from %d sources; counters %v",
		f.attempts.Load(), held, failed, attempts, maxPending, st.PendingSources, b.p.Counters())
	if failed > 0 {
		t.Errorf("%d of %d fresh HBONE connections failed during the flood, want none", failed, attempts)
	}
	if maxPending > 64 {
		t.Errorf("%d handshakes pending, above the limit of 64", maxPending)
	}
	refused := b.p.Rejected(ztunnel.FlagPendingLimit) + b.p.Rejected(ztunnel.FlagSourceLimit)
	// 5/s with bursts of 25, plus a summary per 5 s.
	if bound := 25 + int(5*elapsed.Seconds()) + 1; lines > bound {
		t.Errorf("%d refusal log lines in %v, want at most %d", lines, elapsed, bound)
	}
	if uint64(lines) >= refused {
		t.Errorf("%d refusal lines for %d refusals: nothing was suppressed", lines, refused)
	}
	b.p.Close() // writes the last summary
	if logs.count("ztunnel: more refusals not logged") == 0 {
		t.Error("no summary of the suppressed lines")
	} else if v, _ := logs.attr("ztunnel: more refusals not logged", "suppressed"); v.Uint64() == 0 {
		t.Errorf("summary says %v lines were suppressed", v)
	}
}

// TestDescriptorReserveKeepsOutboundAndTunnelsWorking gives node-b a
// budget of 160 descriptors, 60 of them reserved, and floods its HBONE
// port: the pending handshakes stay below the budget minus the reserve,
// while 30 long outbound connections of a local pod (60 descriptors) and
// tunnels from node-a keep working.
func TestDescriptorReserveKeepsOutboundAndTunnelsWorking(t *testing.T) {
	var o meshOpts
	o.tuning.Limits = ztunnel.Limits{Descriptors: 160, DescriptorReserve: 60, MaxPendingPerIP: 40}
	m := newMesh(t, o)
	b := m.nodes["node-b"]
	f := startFlood(t, floodIPs(8), 30, netip.AddrPortFrom(ipB1, b.hbone), 5000, 200*time.Microsecond)
	waitFor(t, "the flood reaches the reserve", func() bool { return b.p.Rejected(ztunnel.FlagDescriptorReserve) > 0 })
	if st := b.p.Admission(); st.Descriptors > 100+8 {
		t.Errorf("connections use %d descriptors during the flood, want at most the budget minus the reserve (100) and a few in flight", st.Descriptors)
	}

	// Outbound: 30 open local connections b1 -> b2, echoing.
	var open []*net.TCPConn
	for i := range 30 {
		c, err := m.dial(ipB1, m.appAddr(ipB2))
		if err != nil {
			t.Fatalf("outbound connection %d: %v", i, err)
		}
		defer c.Close()
		roundTrip1(t, c)
		open = append(open, c)
	}
	// Tunnels from node-a (its pool's connection is authenticated once).
	for i := range 20 {
		c, err := m.dial(ipA1, m.appAddr(ipB1))
		if err != nil {
			t.Fatalf("connection %d across nodes: %v", i, err)
		}
		roundTrip1(t, c)
		c.Close()
	}
	for _, c := range open {
		roundTrip1(t, c)
	}
	f.stop()
	t.Logf("counters %v, admission %+v", b.p.Counters(), b.p.Admission())
	for _, flag := range []ztunnel.ResponseFlag{ztunnel.FlagConnectFailed, ztunnel.FlagAcceptFailed, ztunnel.FlagHBONEConnectFailed} {
		if n := b.p.Rejected(flag) + m.nodes["node-a"].p.Rejected(flag); n > 0 {
			t.Errorf("%s counted %d times", flag, n)
		}
	}
}

// TestSourceLimitsOfPlaintextAndOutbound caps inbound plaintext per source
// IP and outbound connections per pod: the connection beyond the cap is
// reset at once and counted, others go on, and a freed place is taken
// again.
func TestSourceLimitsOfPlaintextAndOutbound(t *testing.T) {
	var o meshOpts
	o.plaintext = true
	o.tuning.Limits = ztunnel.Limits{MaxInboundPlaintextPerIP: 2, MaxOutboundPerPod: 3}
	m := newMesh(t, o)
	b := m.nodes["node-b"]
	plain := func(src netip.Addr) (*net.TCPConn, error) {
		c, err := bindDialer(src).Dial("tcp4", netip.AddrPortFrom(ipB1, b.plain).String())
		if err != nil {
			return nil, err
		}
		b.orig.Store(c.LocalAddr().(*net.TCPAddr).AddrPort(), m.appAddr(ipB1))
		return c.(*net.TCPConn), nil
	}
	for _, tc := range []struct {
		name  string
		limit int
		dial  func() (*net.TCPConn, error)
		other func() (*net.TCPConn, error)
	}{
		{"inbound plaintext per source IP", 2,
			func() (*net.TCPConn, error) { return plain(ipOutside) },
			func() (*net.TCPConn, error) { return plain(ipUnmesh) }},
		{"outbound per pod", 3,
			func() (*net.TCPConn, error) { return m.dial(ipB1, m.appAddr(ipB2)) },
			func() (*net.TCPConn, error) { return m.dial(ipB2, m.appAddr(ipB1)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := b.p.Rejected(ztunnel.FlagSourceLimit)
			var open []*net.TCPConn
			for range tc.limit {
				c, err := tc.dial()
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				roundTrip1(t, c)
				open = append(open, c)
			}
			// The reset may come before connect returns, or after.
			c, err := tc.dial()
			if err == nil {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = c.Read(make([]byte, 1))
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("connection beyond the limit: %v, want a reset", err)
			}
			b.waitCount(t, ztunnel.FlagSourceLimit, before+1)
			o, err := tc.other()
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			roundTrip1(t, o)
			open[0].Close()
			waitFor(t, "the closed connection's place is free", func() bool {
				st := b.p.Admission()
				return st.InboundPlaintext+st.Outbound < tc.limit+1
			})
			again, err := tc.dial()
			if err != nil {
				t.Fatal(err)
			}
			defer again.Close()
			roundTrip1(t, again)
		})
	}
}

// TestAcceptErrorsBackOffAndAreLoggedRarely makes a listener fail with
// EMFILE: the ztunnel retries after 5 ms, doubling up to 1 s (so it does
// not spin), counts every failure and logs at the refusals' rate.
func TestAcceptErrorsBackOffAndAreLoggedRarely(t *testing.T) {
	c := ztest.NewCA(t, "cluster.local", ca.Options{})
	logs := newLogCounter()
	ln := &failingListener{Listener: listen(t)}
	p, err := ztunnel.New(ztunnel.Config{
		NodeName: "node-a", TrustDomain: c.TrustDomain(), Store: workload.NewStore(), SVIDs: c, Bundles: c.Bundles(),
		Logger: slog.New(logs), Outbound: ln, Limits: ztunnel.Limits{RefusalLogRate: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(context.Background()) }()
	t.Cleanup(func() { p.Close(); <-done })
	start := time.Now()
	// 8 failures wait 5+10+20+40+80+160+320 ms between them.
	waitFor(t, "8 accept failures", func() bool { return p.Rejected(ztunnel.FlagAcceptFailed) >= 8 })
	if elapsed := time.Since(start); elapsed < 635*time.Millisecond {
		t.Errorf("8 failed accepts took %v, want at least 635 ms of back-off", elapsed)
	}
	if calls := ln.calls.Load(); calls > 9 {
		t.Errorf("%d accept calls for %d failures counted", calls, p.Rejected(ztunnel.FlagAcceptFailed))
	}
	// A rate of 1/s: a burst of 5, and at most one more per second.
	if n := logs.count("ztunnel: accept failed"); n > 5+int(time.Since(start).Seconds())+1 {
		t.Errorf("%d log lines for %d accept failures", n, p.Rejected(ztunnel.FlagAcceptFailed))
	}
}

// failingListener's Accept fails with EMFILE.
type failingListener struct {
	net.Listener
	calls atomic.Int64
}

func (l *failingListener) Accept() (net.Conn, error) {
	l.calls.Add(1)
	return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
}
