package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// echoServer echoes every connection it accepts and reports how each one
// ended, by the client's address.
type echoServer struct {
	mu    sync.Mutex
	ended map[netip.AddrPort]chan error
}

// serveEcho runs an echo server on ln until the test ends.
func serveEcho(t *testing.T, ln net.Listener) *echoServer {
	t.Helper()
	e := &echoServer{ended: map[netip.AddrPort]chan error{}}
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
			ch := e.end(netip.MustParseAddrPort(c.RemoteAddr().String()))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, err := io.Copy(c, c)
				ch <- err
			}()
		}
	}()
	return e
}

// end returns the channel that receives how the connection from client
// ended (nil for a clean close).
func (e *echoServer) end(client netip.AddrPort) chan error {
	e.mu.Lock()
	defer e.mu.Unlock()
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	ch := e.ended[client]
	if ch == nil {
		ch = make(chan error, 1)
		e.ended[client] = ch
	}
	return ch
}

func TestPlainFlowsClosesPlaintextServerConnectionsOnly(t *testing.T) {
	privtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tb, err := testbed.New(ctx, testbed.Spec{Nodes: []testbed.NodeSpec{{Name: "node1", Pods: []testbed.PodSpec{
		{Name: "server", Namespace: "shop"}, {Name: "client", Namespace: "legacy"}, {Name: "api", Namespace: "legacy"},
	}}}}, testbed.WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("remove the testbed: %v", err)
		}
	})
	node, server, client, api := tb.Node("node1"), tb.Pod("server"), tb.Pod("client"), tb.Pod("api")

	var pf *PlainFlows
	var veth int
	if err := node.Do(func() error {
		l, err := netlink.LinkByName(server.HostVeth)
		if err != nil {
			return err
		}
		veth = l.Attrs().Index
		pf, err = NewPlainFlows([]netip.Addr{node.IP})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pf.Close)

	listen := func(p *testbed.Pod, network, addr string) *echoServer {
		t.Helper()
		ln, err := p.Listen(ctx, network, addr)
		if err != nil {
			t.Fatal(err)
		}
		return serveEcho(t, ln)
	}
	// 8080: dual-stack (accepted sockets are IPv6 with IPv4-mapped
	// addresses); 8081: IPv4 on the pod's address.
	dual := listen(server, "tcp", "[::]:8080")
	v4 := listen(server, "tcp4", netip.AddrPortFrom(server.IP, 8081).String())
	listen(api, "tcp4", netip.AddrPortFrom(api.IP, 9000).String())

	type conn struct {
		name   string
		c      net.Conn
		srv    *echoServer // the pod's server, nil when the pod is the client
		closed bool
	}
	dial := func(name string, dial func(context.Context, string, string) (net.Conn, error), dst netip.AddrPort, srv *echoServer, closed bool) conn {
		t.Helper()
		c, err := dial(ctx, "tcp4", dst.String())
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		t.Cleanup(func() { c.Close() })
		ping(t, name, c)
		return conn{name, c, srv, closed}
	}
	conns := []conn{
		dial("an unmeshed pod to a dual-stack listener", client.Dial, netip.AddrPortFrom(server.IP, 8080), dual, true),
		dial("an unmeshed pod to an IPv4 listener", client.Dial, netip.AddrPortFrom(server.IP, 8081), v4, true),
		dial("the node (a kubelet probe)", node.Dial, netip.AddrPortFrom(server.IP, 8080), dual, false),
		dial("the pod to another pod (its own client side)", server.Dial, netip.AddrPortFrom(api.IP, 9000), nil, false),
		dial("the pod to itself", server.Dial, netip.AddrPortFrom(server.IP, 8081), v4, false),
		dial("the pod to itself on loopback", server.Dial, netip.MustParseAddrPort("127.0.0.1:8080"), dual, false),
	}

	peers, err := pf.ClosePlaintext(ctx, veth, []netip.Addr{server.IP})
	if err != nil {
		t.Fatalf("ClosePlaintext: %v", err)
	}
	var want []netip.AddrPort
	for _, c := range conns {
		if c.closed {
			want = append(want, netip.MustParseAddrPort(c.c.LocalAddr().String()))
		}
	}
	slices.SortFunc(peers, netip.AddrPort.Compare)
	slices.SortFunc(want, netip.AddrPort.Compare)
	if !slices.Equal(peers, want) {
		t.Errorf("ClosePlaintext closed the connections of %v, want those of %v", peers, want)
	}

	for _, c := range conns {
		if !c.closed {
			ping(t, c.name+" after ClosePlaintext", c.c)
			continue
		}
		// The client learns at once, without sending: the pod's kernel
		// sent it a reset. The deadline only bounds a failing test.
		start := time.Now()
		_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.c.Read(make([]byte, 1))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: the client's read returned %v, want a reset", c.name, err)
		} else {
			t.Logf("%s: the client saw the reset after %v", c.name, time.Since(start))
		}
		select {
		case err := <-c.srv.end(netip.MustParseAddrPort(c.c.LocalAddr().String())):
			if !errors.Is(err, syscall.ECONNABORTED) {
				t.Errorf("%s: the server's connection ended with %v, want ECONNABORTED", c.name, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("%s: the server's connection is still open", c.name)
		}
	}

	if peers, err := pf.ClosePlaintext(ctx, veth, []netip.Addr{server.IP}); err != nil || len(peers) != 0 {
		t.Errorf("ClosePlaintext again = %v, %v; want nothing left to close", peers, err)
	}
}

// ping sends a message on c and reads its echo.
func ping(t *testing.T, name string, c net.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	msg := []byte("ping")
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("%s: write: %v", name, err)
	}
	if _, err := io.ReadFull(c, msg); err != nil {
		t.Fatalf("%s: read the echo: %v", name, err)
	}
}

func TestPlainFlowsFailsForAVethWithoutPeerNamespace(t *testing.T) {
	privtest.Require(t)
	inFreshNetns(t, func(h *netlink.Handle) {
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mt-h0"}, PeerName: "mt-p0"}); err != nil {
			t.Fatal(err)
		}
		l, err := h.LinkByName("mt-h0")
		if err != nil {
			t.Fatal(err)
		}
		pf, err := NewPlainFlows(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer pf.Close()
		_, err = pf.ClosePlaintext(context.Background(), l.Attrs().Index, []netip.Addr{netip.MustParseAddr("198.19.1.10")})
		want := fmt.Sprintf("veth %d (mt-h0) has no peer namespace: its other end is in the node's namespace", l.Attrs().Index)
		if err == nil || err.Error() != want {
			t.Errorf("ClosePlaintext error = %v, want %s", err, want)
		}
	})
}
