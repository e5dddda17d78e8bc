package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// endServer is an echo server that reports how each of its connections
// ended, by client address.
type endServer struct {
	mu    sync.Mutex
	ended map[netip.AddrPort]chan error
}

// serveEnds runs an endServer on port of pod until the test ends.
func serveEnds(t *testing.T, m *meshtest.Mesh, pod string, port uint16) *endServer {
	t.Helper()
	ln, err := m.Listen(context.Background(), pod, port)
	if err != nil {
		t.Fatal(err)
	}
	s := &endServer{ended: map[netip.AddrPort]chan error{}}
	var wg sync.WaitGroup
	var conns sync.Map
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			ended := s.end(netip.MustParseAddrPort(c.RemoteAddr().String()))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, err := io.Copy(c, c)
				ended <- err
			}()
		}
	}()
	return s
}

// end returns the channel that receives how the connection from client
// ended (nil: closed by the client).
func (s *endServer) end(client netip.AddrPort) chan error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.ended[client]
	if ch == nil {
		ch = make(chan error, 1)
		s.ended[client] = ch
	}
	return ch
}

// TestSwitchingToStrictClosesPlaintextThatBypassedTheZtunnel opens
// connections to a PERMISSIVE server pod, then makes its namespace STRICT
// in the cluster file. The plaintext connection from an unmeshed pod of
// the same node, which never went through the ztunnel, ends on both sides
// at once (the client reads a reset, the server's read fails), is logged
// and counted. Plaintext from another node, which the ztunnel carried, is
// closed by the ztunnel's re-evaluation, not by the agent. Connections
// through the ztunnel (from a meshed pod of the same node and over HBONE
// from another node), the node's own (kubelet probes) and one the server
// pod opened itself (to an excluded port, so not through the ztunnel
// either) carry on.
func TestSwitchingToStrictClosesPlaintextThatBypassedTheZtunnel(t *testing.T) {
	const excluded = 9000
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "vault"},
				{Name: "client", Namespace: "vault"},
				{Name: "legacy", Namespace: "plain"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "remote", Namespace: "vault"}, {Name: "outsider", Namespace: "plain"}}},
		},
		Namespaces: map[string]map[string]string{"vault": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{AgentArgs: []string{"--exclude-port", strconv.Itoa(excluded)}})
	srv := serveEnds(t, m, "server", appPort)
	echo(t, m, "legacy", excluded)
	server := netip.AddrPortFrom(m.Pod("server").IP, appPort)

	type conn struct {
		name string
		c    net.Conn
	}
	open := func(name, from string, to netip.AddrPort) conn {
		t.Helper()
		var c net.Conn
		if from == "node1" {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var err error
			if c, err = m.Node("node1").Dial(ctx, "tcp4", to.String()); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			t.Cleanup(func() { c.Close() })
		} else {
			c = dial(t, m, from, to)
		}
		ping(t, c, "before STRICT")
		return conn{name, c}
	}
	plain := open("plaintext from an unmeshed pod of the node", "legacy", server)
	carried := open("plaintext from an unmeshed pod of another node, through the ztunnel", "outsider", server)
	kept := []conn{
		open("a meshed pod of the node, through the ztunnel", "client", server),
		open("a meshed pod of another node, over HBONE", "remote", server),
		open("the node itself (kubelet probes)", "node1", server),
		open("the server pod's own connection to an excluded port", "server", netip.AddrPortFrom(m.Pod("legacy").IP, excluded)),
	}

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.SetNamespaceAnnotations(ctx, "vault", map[string]string{meshed: "enabled", meshtest.MTLSAnnotation: "STRICT"}); err != nil {
		t.Fatal(err)
	}
	// The client sends nothing: it learns from the reset the server pod's
	// kernel sends. The deadline only bounds a failing test.
	_ = plain.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := plain.c.Read(make([]byte, 1))
	took := time.Since(start)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: read returned %v %v after the switch; want a reset", plain.name, err, took)
	}
	t.Logf("file rewritten to the plaintext client reset: %v", took)
	if took > 5*time.Second {
		t.Errorf("the plaintext connection ended %v after the switch; want within the file watcher's poll (a few hundred ms)", took)
	}
	select {
	case err := <-srv.end(netip.MustParseAddrPort(plain.c.LocalAddr().String())):
		if !errors.Is(err, syscall.ECONNABORTED) {
			t.Errorf("the server's side of the plaintext connection ended with %v, want ECONNABORTED", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the server's side of the plaintext connection is still open")
	}

	// The ztunnel carried the other plaintext connection: it decides it
	// again and closes it, the agent leaves it alone.
	_ = carried.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := carried.c.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("%s: still open after the switch", carried.name)
	}
	if _, err := m.WaitFlow(ctx, "node1", func(f meshtest.Flow) bool {
		return f.Direction == "inbound_plaintext" && f.Src.String() == carried.c.LocalAddr().String() && f.Flag == "strict_plaintext"
	}); err != nil {
		t.Errorf("%s: %v", carried.name, err)
	}
	for _, c := range kept {
		ping(t, c.c, "after STRICT: "+c.name)
	}
	if c, err := m.Dial(ctx, "client", server); err != nil {
		t.Errorf("a new connection from a meshed pod after the switch: %v", err)
	} else {
		ping(t, c, "new")
		c.Close()
	}
	waitSeries(t, m, "node1", "mantlet_strict_plaintext_connections_closed_total", map[string]string{}, 1, 0)

	// The agent's log reaches the test through a pipe: wait for the line.
	var lines []map[string]any
	for deadline := time.Now().Add(10 * time.Second); len(lines) == 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		for _, r := range m.Records("node1") {
			if r["msg"] == "STRICT: plaintext connections that bypassed the ztunnel closed" && r["pod"] == "vault/server" {
				lines = append(lines, r)
			}
		}
	}
	if len(lines) != 1 || lines[0]["closed"] != 1.0 || lines[0]["level"] != "INFO" {
		t.Errorf("node1 logged %v; want one Info line for vault/server with closed=1", lines)
	}
}
