// Loopback addresses other than 127.0.0.1 need Linux.

//go:build linux

package enforce

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/ztunnel"
)

// dstListener reports every accepted connection's LocalAddr as dst, the
// way the capture preserves the original destination.
type dstListener struct {
	net.Listener
	dst net.Addr
}

func (l dstListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return dstConn{c, l.dst}, nil
}

type dstConn struct {
	net.Conn
	dst net.Addr
}

func (c dstConn) LocalAddr() net.Addr { return c.dst }

type noSVIDs struct{}

func (noSVIDs) SVID(context.Context, spiffeid.ID) (*x509svid.SVID, error) {
	return nil, errors.New("no SVIDs in this test")
}

// echo serves an echo app at addr until the test ends.
func echo(t *testing.T, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// plaintextProxy runs a ztunnel of node-b whose inbound plaintext
// listener delivers to app, authorized by fx.az.
func plaintextProxy(t *testing.T, fx *fixture, app netip.AddrPort, records chan<- *ztunnel.FlowRecord) (*ztunnel.Proxy, netip.AddrPort) {
	t.Helper()
	store := workload.NewStore()
	store.Replace(fx.snap)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := ztunnel.New(ztunnel.Config{
		NodeName: "node-b", TrustDomain: identity.DefaultTrustDomain, Store: store, SVIDs: noSVIDs{}, Bundles: x509bundle.NewSet(),
		Authorizer: fx.az, InboundPlaintext: dstListener{ln, net.TCPAddrFromAddrPort(app)},
		OnFlowEnd: func(r *ztunnel.FlowRecord) { records <- r },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return p, ln.Addr().(*net.TCPAddr).AddrPort()
}

func dialFrom(t *testing.T, src netip.Addr, to netip.AddrPort) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
	c, err := d.Dial("tcp4", to.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// ping reports whether an echo round trip works on c.
func ping(c *net.TCPConn) bool {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	b := make([]byte, 4)
	_, err := io.ReadFull(c, b)
	return err == nil && string(b) == "ping"
}

func TestPolicyChangeClosesOpenFlowsItNowDenies(t *testing.T) {
	fx := newFixture(t, Options{})
	records := make(chan *ztunnel.FlowRecord, 16)
	app := echo(t, netip.AddrPortFrom(ipPay, 0))
	p, in := plaintextProxy(t, fx, app, records)

	stays := dialFrom(t, netip.MustParseAddr("127.0.9.9"), in)
	goes := dialFrom(t, netip.MustParseAddr("127.0.9.200"), in)
	if !ping(stays) || !ping(goes) {
		t.Fatal("plaintext sources in 127.0.9.0/24 should get in")
	}
	refused := dialFrom(t, ipOutside, in)
	if ping(refused) {
		t.Fatal("a plaintext source outside the block got in")
	}
	if r := <-records; r.Flag != ztunnel.FlagPolicyDenied || r.Direction != ztunnel.InboundPlaintext {
		t.Fatalf("refused flow: flag %s direction %s", r.Flag, r.Direction)
	}
	fx.rec.take()
	// The client reads the echo as soon as it is written; the copy that
	// wrote it counts it right after, so wait until the registry counted
	// both pings both ways: the event below reports those counts.
	deadline := time.Now().Add(5 * time.Second)
	for counted := 0; counted < 2; {
		counted = 0
		p.OpenFlows(func(l *ztunnel.LiveFlow) bool {
			if sent, received := l.Bytes(); sent == 4 && received == 4 {
				counted++
			}
			return true
		})
		if time.Now().After(deadline) {
			t.Fatalf("after the pings, %d of 2 open flows counted 4 bytes each way", counted)
		}
		time.Sleep(time.Millisecond)
	}

	// Narrow the allowed block to 127.0.9.0/25.
	ps, err := policy.Parse([]byte(testPolicies))
	if err != nil {
		t.Fatal(err)
	}
	ps[0].Spec.Rules[1].From[0].IPBlocks[0].CIDR = "127.0.9.0/25"
	if err := fx.eng.Update(ps); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if n := fx.az.Reevaluate(p, fx.snap); n != 1 {
		t.Fatalf("Reevaluate closed %d flows, want 1", n)
	}
	goes.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(goes); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the denied flow stayed open")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the denied flow closed after %v", d)
	}
	r := <-records
	if r.Flag != ztunnel.FlagPolicyDenied || r.Src.Addr() != netip.MustParseAddr("127.0.9.200") {
		t.Fatalf("closed flow: flag %s src %s", r.Flag, r.Src)
	}
	// The record reads as denied by the re-evaluation, and keeps the
	// verdict that had admitted it.
	wantVerdict := ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Rule: -1, Reason: "no-allow-matched"}
	if r.Verdict != wantVerdict || !r.Admitted.Allow || r.Admitted.Reason != "allowed-by-policy" {
		t.Fatalf("closed flow: verdict %+v admitted %+v; want %+v after an allowed-by-policy admission", r.Verdict, r.Admitted, wantVerdict)
	}
	if !ping(stays) {
		t.Fatal("the flow the new policy still allows was cut")
	}
	fx.rec.mu.Lock()
	evs := slices.Clone(fx.rec.ev)
	fx.rec.mu.Unlock()
	want := []string{"deny reevaluate denied no-allow-matched policy_denied"}
	if got := fx.rec.take(); !slices.Equal(got, want) {
		t.Fatalf("events %q, want %q", got, want)
	}
	// The event names the flow it cut, with what it carried (the ping).
	if e := evs[0]; e.ID != r.ID || e.Path != string(r.Path) || e.BytesSent != 4 || e.BytesReceived != 4 {
		t.Fatalf("event of flow %d (%s) carried %d/%d bytes; want flow %d (%s), 4/4", e.ID, e.Path, e.BytesSent, e.BytesReceived, r.ID, r.Path)
	}

	// A workload change: payments loses the label the ALLOW policy
	// selects, so nothing restricts it any more and nothing is closed.
	snap := testSnapshot(t, map[string]string{"app": "payments-v2"})
	fx.eng.SetWorkloads(snap)
	if n := fx.az.Reevaluate(p, snap); n != 0 {
		t.Fatalf("Reevaluate after relabel closed %d flows", n)
	}
	if !ping(stays) {
		t.Fatal("flow cut after relabel")
	}
}
