// The in-process mesh needs all of 127.0.0.0/8 on loopback: Linux only.

//go:build linux

package ztunnel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel"
)

// liveFlow waits until n has an open flow from src to dst and returns it.
// src must carry the client's port: a flow of an earlier connection from
// the same address may still be open while its end travels through the
// mesh (the destination learns of it only when the source's reset
// arrives).
func (n *node) liveFlow(t *testing.T, dir ztunnel.Direction, src, dst netip.AddrPort) *ztunnel.LiveFlow {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var found *ztunnel.LiveFlow
		n.p.OpenFlows(func(l *ztunnel.LiveFlow) bool {
			if l.Direction() == dir && l.Flow().SrcAddr == src && l.Flow().DstAddr == dst {
				found = l
				return false
			}
			return true
		})
		if found != nil {
			return found
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no open %s flow %s -> %s (%d open)", n.name, dir, src, dst, n.p.NumOpenFlows())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitBytes waits until l counted at least sent and received bytes.
func waitBytes(t *testing.T, l *ztunnel.LiveFlow, sent, received int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, r := l.Bytes()
		if s >= sent && r >= received {
			if s != sent || r != received {
				t.Fatalf("bytes = %d sent, %d received; want %d, %d", s, r, sent, received)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("bytes = %d sent, %d received; want %d, %d", s, r, sent, received)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOpenFlowsCountBytesAndClose(t *testing.T) {
	m := newMesh(t, meshOpts{})
	for _, tc := range []struct {
		name    string
		dst     netip.AddrPort
		node    string // whose registry is checked
		dir     ztunnel.Direction
		path    ztunnel.Path
		checkID bool
	}{
		{"an HBONE flow at the source", m.appAddr(ipB1), "node-a", ztunnel.Outbound, ztunnel.PathHBONE, true},
		{"an HBONE flow at the destination", m.appAddr(ipB1), "node-b", ztunnel.Inbound, ztunnel.PathHBONE, true},
		{"a same-node flow", m.appAddr(ipA2), "node-a", ztunnel.Outbound, ztunnel.PathLocal, true},
		{"a passthrough flow", m.appAddr(ipOutside), "node-a", ztunnel.Outbound, ztunnel.PathPassthrough, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := m.nodes[tc.node]
			c := m.mustDial(ipA1, tc.dst)
			// Two round trips on an open connection: the counters move
			// while the flow is open, not only at its end.
			for i, msg := range []string{"first", "second message"} {
				if _, err := c.Write([]byte(msg)); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
					t.Fatalf("echo %d = %q, %v", i, got, err)
				}
			}
			l := n.liveFlow(t, tc.dir, c.LocalAddr().(*net.TCPAddr).AddrPort(), tc.dst)
			waitBytes(t, l, int64(len("first")+len("second message")), int64(len("first")+len("second message")))
			if l.Path() != tc.path || l.Start().IsZero() || time.Since(l.Start()) > time.Minute {
				t.Fatalf("path %s start %v; want %s", l.Path(), l.Start(), tc.path)
			}
			if tc.checkID && (l.Flow().SrcID != m.id("frontend") || l.DstID().IsZero() || l.Flow().Dst == nil) {
				t.Fatalf("flow src %s dst %s (%v)", l.Flow().SrcID, l.DstID(), l.Flow().Dst)
			}
			closed := time.Now()
			l.Close(ztunnel.FlagPolicyDenied)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err) {
				t.Fatalf("client read after Close: %v", err)
			}
			if d := time.Since(closed); d > time.Second {
				t.Fatalf("client saw the close after %v", d)
			}
			r := n.flow(t)
			for r.Direction != tc.dir || r.Src != c.LocalAddr().(*net.TCPAddr).AddrPort() {
				r = n.flow(t)
			}
			if r.Flag != ztunnel.FlagPolicyDenied || r.Sent != int64(len("first")+len("second message")) {
				t.Fatalf("record flag %s sent %d err %v", r.Flag, r.Sent, r.Err)
			}
			if flag, ok := l.ClosedBy(); !ok || flag != ztunnel.FlagPolicyDenied {
				t.Fatalf("ClosedBy = %s, %v", flag, ok)
			}
			waitOpen(t, n, 0)
		})
	}
}

func TestDenyEndsAFlowAsDeniedByItsPolicy(t *testing.T) {
	m := newMesh(t, meshOpts{})
	n := m.nodes["node-a"]
	c, l := pingedFlow(t, m, n)
	refusal := ztunnel.Verdict{Allow: true, Policy: "shop/deny-frontend", Rule: 2, Reason: "denied-by-policy"}
	l.Deny(refusal)
	l.Close(ztunnel.FlagShutdown) // too late: the first counts
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the flow stayed open after Deny")
	}
	r := n.flow(t)
	for r.Src != c.LocalAddr().(*net.TCPAddr).AddrPort() {
		r = n.flow(t)
	}
	refusal.Allow, refusal.Flag = false, ztunnel.FlagPolicyDenied
	if r.Flag != ztunnel.FlagPolicyDenied || r.Verdict != refusal || !r.Admitted.Allow {
		t.Fatalf("record: flag %s verdict %+v admitted %+v; want %s, %+v, the admission", r.Flag, r.Verdict, r.Admitted, ztunnel.FlagPolicyDenied, refusal)
	}
	if want := `ztunnel: flow closed: now refused (policy_denied) by policy "shop/deny-frontend"`; r.Err == nil || r.Err.Error() != want {
		t.Fatalf("record error %v, want %s", r.Err, want)
	}
	if flag, ok := l.ClosedBy(); !ok || flag != ztunnel.FlagPolicyDenied {
		t.Fatalf("ClosedBy = %s, %v", flag, ok)
	}
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op)
}

// waitOpen waits until n has want open flows.
func waitOpen(t *testing.T, n *node, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for n.p.NumOpenFlows() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d open flows, want %d", n.name, n.p.NumOpenFlows(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestMaxFlowsRefusesBeyondTheLimit(t *testing.T) {
	var o meshOpts
	o.tuning.MaxFlows = 2
	m := newMesh(t, o)
	a := m.nodes["node-a"]
	var open []*net.TCPConn
	for range 2 {
		c := m.mustDial(ipA1, m.appAddr(ipA2))
		roundTrip1(t, c)
		open = append(open, c)
	}
	c := m.mustDial(ipA1, m.appAddr(ipA2))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, _ := io.ReadAll(c); len(b) != 0 {
		t.Fatalf("third flow got %q", b)
	}
	if r := a.flow(t); r.Flag != ztunnel.FlagFlowLimit {
		t.Fatalf("third flow: flag %s, want %s", r.Flag, ztunnel.FlagFlowLimit)
	}
	open[0].Close()
	waitOpen(t, a, 1)
	roundTrip1(t, m.mustDial(ipA1, m.appAddr(ipA2)))
}

// roundTrip1 echoes one message on an open connection.
func roundTrip1(t *testing.T, c *net.TCPConn) {
	t.Helper()
	c.Write([]byte("ping"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo = %q, %v", got, err)
	}
}

// countingAuthz allows every flow and counts Release calls.
type countingAuthz struct {
	mu               sync.Mutex
	allowed, release int
	preChecks        int
}

func (a *countingAuthz) Authorize(_ context.Context, f *ztunnel.Flow) ztunnel.Verdict {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.allowed++
	if f.PreCheck {
		a.preChecks++
	}
	return ztunnel.Verdict{Allow: true}
}

func (a *countingAuthz) Release(*ztunnel.Flow, ztunnel.Verdict) {
	a.mu.Lock()
	a.release++
	a.mu.Unlock()
}

func TestReleaserSeesEveryAllowedFlowEnd(t *testing.T) {
	az := &countingAuthz{}
	m := newMesh(t, meshOpts{authz: map[string]ztunnel.Authorizer{"node-a": az, "node-b": az}})
	for _, dst := range []netip.AddrPort{m.appAddr(ipB1), m.appAddr(ipA2), m.appAddr(ipOutside)} {
		roundTrip(t, m.mustDial(ipA1, dst), bytes.Repeat([]byte("r"), 1000))
	}
	waitOpen(t, m.nodes["node-a"], 0)
	waitOpen(t, m.nodes["node-b"], 0)
	az.mu.Lock()
	defer az.mu.Unlock()
	// node-a: a pre-check for b1, the local and the passthrough flow;
	// node-b: the inbound flow.
	if az.allowed != 4 || az.release != 4 || az.preChecks != 1 {
		t.Fatalf("authorized %d (pre-checks %d), released %d; want 4 (1), 4", az.allowed, az.preChecks, az.release)
	}
}

// TestAClosedFlowIsLoggedAsAFlowNotARefusal: a flow admitted and then
// closed without a reason (LiveFlow.Close(FlagNone)) broke; its line is
// "ztunnel: flow" with reason closed, never "ztunnel: refused", which
// operators and the refusal lines' rate limit keep for refused
// connections.
func TestAClosedFlowIsLoggedAsAFlowNotARefusal(t *testing.T) {
	logs := newLogCounter()
	m := newMesh(t, meshOpts{logger: slog.New(logs)})
	n := m.nodes["node-a"]
	c, l := pingedFlow(t, m, n)
	l.Close(ztunnel.FlagNone)
	r := n.flow(t)
	for r.Src != c.LocalAddr().(*net.TCPAddr).AddrPort() {
		r = n.flow(t)
	}
	if r.Flag != ztunnel.FlagClosed {
		t.Fatalf("record flag %s, want %s", r.Flag, ztunnel.FlagClosed)
	}
	if n := logs.count("ztunnel: refused"); n != 0 {
		t.Errorf("%d \"ztunnel: refused\" lines for a flow that was admitted and closed", n)
	}
	if v, ok := logs.attr("ztunnel: flow", "reason"); !ok || v.String() != "closed" {
		t.Errorf("the last \"ztunnel: flow\" line has reason %v (%v), want closed", v, ok)
	}
}

// pingedFlow opens a flow from A1 to A2 through n, echoes "ping" on it
// and returns the client's connection and the flow as n's registry has it.
func pingedFlow(t *testing.T, m *mesh, n *node) (*net.TCPConn, *ztunnel.LiveFlow) {
	t.Helper()
	c := m.mustDial(ipA1, m.appAddr(ipA2))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	return c, n.liveFlow(t, ztunnel.Outbound, c.LocalAddr().(*net.TCPAddr).AddrPort(), m.appAddr(ipA2))
}
