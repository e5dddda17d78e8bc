// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel"
)

// How a flow ends, as the applications see it: an orderly end of one
// side's data reaches the other as a FIN, anything else as a reset.

// party is an application's end of a test connection: it reads until the
// connection ends or fails, counting what it read.
type party struct {
	c       *net.TCPConn
	n       atomic.Int64
	mark    int64
	reached chan struct{} // closed once mark bytes were read
	ended   chan struct{} // closed when the read ended; then err is set
	err     error         // nil for EOF
	data    []byte        // what was read, when keeping it
}

// newParty starts reading c; keep retains what it reads.
func newParty(c *net.TCPConn, mark int64, keep bool) *party {
	p := &party{c: c, mark: mark, reached: make(chan struct{}), ended: make(chan struct{})}
	// Bounds a failing test only.
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	go func() {
		defer close(p.ended)
		buf := make([]byte, 32<<10)
		reached := false
		for {
			n, err := c.Read(buf)
			if keep {
				p.data = append(p.data, buf[:n]...)
			}
			if p.n.Add(int64(n)) >= p.mark && !reached {
				reached = true
				close(p.reached)
			}
			if err != nil {
				if err != io.EOF {
					p.err = err
				}
				return
			}
		}
	}()
	return p
}

// wait waits until the party's read ended and returns how (nil: EOF).
func (p *party) wait(t *testing.T, who string) error {
	t.Helper()
	select {
	case <-p.ended:
		return p.err
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: the read did not end", who)
		return nil
	}
}

// reset resets the party's connection, as an application that closes with
// SO_LINGER 0, or dies with unread data, does.
func (p *party) reset() {
	p.c.SetLinger(0)
	p.c.Close()
}

// serve makes a's next connection a party and hands it over.
func serve(t *testing.T, a *app, mark int64, keep bool) <-chan *party {
	parties := make(chan *party, 1)
	a.setHandler(func(c *net.TCPConn) {
		p := newParty(c, mark, keep)
		parties <- p
		<-p.ended
	})
	t.Cleanup(func() { a.setHandler(nil) })
	return parties
}

func accepted(t *testing.T, parties <-chan *party) *party {
	t.Helper()
	select {
	case p := <-parties:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("the server application accepted no connection")
		return nil
	}
}

// flowOf waits for n's record of the flow of the client at src.
func (n *node) flowOf(t *testing.T, src netip.AddrPort) *ztunnel.FlowRecord {
	t.Helper()
	for {
		if r := n.flow(t); r.Src == src {
			return r
		}
	}
}

// relay carries TCP connections to a ztunnel's HBONE port until cut; cut
// closes both sides of each at once, as the death of a peer's process
// closes its sockets.
type relay struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

// relayHBONE routes the mesh's HBONE connections to pod b1 through a relay.
func (m *mesh) relayHBONE(t *testing.T) *relay {
	ln, err := net.Listen("tcp4", "127.0.5.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln}
	target := netip.AddrPortFrom(ipB1, m.nodes["node-b"].hbone)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := bindDialer(ipA1).Dial("tcp4", target.String())
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, c, up)
			r.mu.Unlock()
			r.wg.Add(2)
			go func() { defer r.wg.Done(); io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
			go func() { defer r.wg.Done(); io.Copy(c, up); c.(*net.TCPConn).CloseWrite() }()
		}
	}()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	m.via.Store(&addr)
	t.Cleanup(func() {
		ln.Close()
		r.cut()
		r.wg.Wait()
	})
	return r
}

func (r *relay) cut() {
	r.mu.Lock()
	conns := r.conns
	r.conns = nil
	r.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

func TestAbnormalEndsReachTheApplicationsAsResets(t *testing.T) {
	m := newMesh(t, meshOpts{})
	r := m.relayHBONE(t)
	a, b := m.nodes["node-a"], m.nodes["node-b"]
	const chunk = 256 << 10
	type want struct {
		a, b ztunnel.ResponseFlag // records of node-a and node-b (FlagNone: no record)
	}
	for _, path := range []struct {
		name   string
		server netip.Addr
		hbone  bool
	}{
		{"hbone", ipB1, true},
		{"local", ipA2, false},
		{"passthrough", ipOutside, false},
	} {
		for _, action := range []struct {
			name   string
			hbone  bool // only over HBONE
			client bool // the client acts: the server must see the reset
			server bool // the server acts: the client must see the reset
			act    func(t *testing.T, client *party, dst netip.AddrPort, server *party)
			want   want
			local  ztunnel.ResponseFlag // node-a's record on the local and passthrough paths
		}{
			{name: "the server resets", server: true,
				act:  func(_ *testing.T, _ *party, _ netip.AddrPort, s *party) { s.reset() },
				want: want{ztunnel.FlagUpstreamReset, ztunnel.FlagUpstreamReset}, local: ztunnel.FlagUpstreamReset},
			{name: "the client resets", client: true,
				act:  func(_ *testing.T, c *party, _ netip.AddrPort, _ *party) { c.reset() },
				want: want{ztunnel.FlagDownstreamReset, ztunnel.FlagTunnelReset}, local: ztunnel.FlagDownstreamReset},
			{name: "the source ztunnel closes the flow",
				act: func(t *testing.T, c *party, dst netip.AddrPort, _ *party) {
					a.liveFlow(t, ztunnel.Outbound, c.c.LocalAddr().(*net.TCPAddr).AddrPort(), dst).Close(ztunnel.FlagNone)
				},
				want: want{ztunnel.FlagClosed, ztunnel.FlagTunnelReset}, local: ztunnel.FlagClosed},
			{name: "the destination ztunnel closes the flow", hbone: true,
				act: func(t *testing.T, c *party, dst netip.AddrPort, _ *party) {
					b.liveFlow(t, ztunnel.Inbound, c.c.LocalAddr().(*net.TCPAddr).AddrPort(), dst).Close(ztunnel.FlagNone)
				},
				want: want{ztunnel.FlagTunnelReset, ztunnel.FlagClosed}},
			{name: "the HBONE connection is cut", hbone: true,
				act:  func(*testing.T, *party, netip.AddrPort, *party) { r.cut() },
				want: want{ztunnel.FlagTunnelLost, ztunnel.FlagTunnelLost}},
		} {
			if action.hbone && !path.hbone {
				continue
			}
			for _, upload := range []bool{true, false} {
				dir := "download"
				if upload {
					dir = "upload"
				}
				t.Run(path.name+"/"+action.name+"/"+dir, func(t *testing.T) {
					parties := serve(t, m.apps[path.server], chunk, false)
					c := m.mustDial(ipA1, m.appAddr(path.server))
					client := newParty(c, chunk, false)
					server := accepted(t, parties)
					sender, receiver := server, client
					if upload {
						sender, receiver = client, server
					}
					// The sender sends a chunk and pauses, without ending its
					// data: the flow is cut in the middle. It waits for its
					// write to finish so that the reset reaches its read (the
					// kernel reports a reset once, to whichever call comes
					// first).
					wrote := make(chan error, 1)
					go func() { _, err := sender.c.Write(bytes.Repeat([]byte{'m'}, chunk)); wrote <- err }()
					select {
					case <-receiver.reached:
					case <-time.After(20 * time.Second):
						t.Fatalf("the receiver got %d of %d bytes", receiver.n.Load(), chunk)
					}
					if err := <-wrote; err != nil {
						t.Fatal(err)
					}
					action.act(t, client, m.appAddr(path.server), server)
					if !action.client {
						if err := client.wait(t, "client"); !errors.Is(err, syscall.ECONNRESET) {
							t.Errorf("the client's read ended with %v, want a reset", err)
						}
					}
					if !action.server {
						if err := server.wait(t, "server"); !errors.Is(err, syscall.ECONNRESET) {
							t.Errorf("the server's read ended with %v, want a reset", err)
						}
					}
					src := c.LocalAddr().(*net.TCPAddr).AddrPort()
					wantA := action.local
					if path.hbone {
						wantA = action.want.a
					}
					if rec := a.flowOf(t, src); rec.Flag != wantA {
						t.Errorf("node-a recorded %s (%v), want %s", rec.Flag, rec.Err, wantA)
					}
					if path.hbone {
						if rec := b.flowOf(t, src); rec.Flag != action.want.b {
							t.Errorf("node-b recorded %s (%v), want %s", rec.Flag, rec.Err, action.want.b)
						}
					}
				})
			}
		}
	}
}

func TestOrderlyEndsDeliverEverythingQueued(t *testing.T) {
	m := newMesh(t, meshOpts{})
	a, b := m.nodes["node-a"], m.nodes["node-b"]
	// Small enough to wait in the ztunnels' and the client's socket
	// buffers (the kernel starts a loopback socket's send buffer above
	// 1 MiB) while the client reads nothing.
	const answer = 128 << 10
	for _, path := range []struct {
		name   string
		server netip.Addr
		hbone  bool
	}{
		{"hbone", ipB1, true},
		{"local", ipA2, false},
		{"passthrough", ipOutside, false},
	} {
		t.Run(path.name, func(t *testing.T) {
			m.apps[path.server].setHandler(func(c *net.TCPConn) {
				if req, err := io.ReadAll(c); err != nil || string(req) != "request" {
					return
				}
				c.Write(bytes.Repeat([]byte{'a'}, answer))
				c.CloseWrite()
			})
			defer m.apps[path.server].setHandler(nil)
			c := m.mustDial(ipA1, m.appAddr(path.server))
			c.Write([]byte("request"))
			c.CloseWrite()
			// The ztunnels end their flows, closing their sockets with the
			// answer still queued towards the client; only then does it
			// read.
			src := c.LocalAddr().(*net.TCPAddr).AddrPort()
			nodes := []*node{a}
			if path.hbone {
				nodes = append(nodes, b)
			}
			for _, n := range nodes {
				if rec := n.flowOf(t, src); rec.Flag != ztunnel.FlagNone || rec.Err != nil {
					t.Errorf("%s recorded %s (%v), want an orderly end", n.name, rec.Flag, rec.Err)
				}
			}
			client := newParty(c, answer, true)
			if err := client.wait(t, "client"); err != nil || len(client.data) != answer {
				t.Fatalf("the client read %d bytes, then %v; want %d and EOF", len(client.data), err, answer)
			}
		})
	}
}

func TestRefusedDestinationsResetTheClient(t *testing.T) {
	closedPort := func() uint16 {
		ln := listen(t)
		p := port(ln)
		ln.Close()
		return p
	}()
	m := newMesh(t, meshOpts{})
	a := m.nodes["node-a"]
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
		want ztunnel.ResponseFlag
	}{
		{"a closed port on the same node", netip.AddrPortFrom(ipA2, closedPort), ztunnel.FlagConnectFailed},
		{"a closed port outside the mesh", netip.AddrPortFrom(ipOutside, closedPort), ztunnel.FlagConnectFailed},
		{"a closed port on another node", netip.AddrPortFrom(ipB1, closedPort), ztunnel.FlagHBONERefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := m.mustDial(ipA1, tc.dst)
			// The client sends nothing: the reset is what its read gets.
			client := newParty(c, 0, false)
			if err := client.wait(t, "client"); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("the client's read ended with %v, want a reset", err)
			}
			if rec := a.flowOf(t, c.LocalAddr().(*net.TCPAddr).AddrPort()); rec.Flag != tc.want {
				t.Errorf("node-a recorded %s (%v), want %s", rec.Flag, rec.Err, tc.want)
			}
		})
	}
}

func TestShutdownPastItsDeadlineResetsBothApplications(t *testing.T) {
	// The closing ztunnel resets its streams and closes its HBONE
	// connections at once: the other records whichever it saw first.
	tunnel := []ztunnel.ResponseFlag{ztunnel.FlagTunnelLost, ztunnel.FlagTunnelReset}
	shutdown := []ztunnel.ResponseFlag{ztunnel.FlagShutdown}
	for _, tc := range []struct {
		node         string
		wantA, wantB []ztunnel.ResponseFlag
	}{
		{"node-a", shutdown, tunnel},
		{"node-b", tunnel, shutdown},
	} {
		t.Run(tc.node+" shuts down", func(t *testing.T) {
			m := newMesh(t, meshOpts{})
			a, b := m.nodes["node-a"], m.nodes["node-b"]
			parties := serve(t, m.apps[ipB1], 1, false)
			c := m.mustDial(ipA1, m.appAddr(ipB1))
			client := newParty(c, 1, false)
			server := accepted(t, parties)
			c.Write([]byte("x"))
			<-server.reached
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			if err := m.nodes[tc.node].p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
			}
			for who, p := range map[string]*party{"client": client, "server": server} {
				if err := p.wait(t, who); !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("the %s's read ended with %v, want a reset", who, err)
				}
			}
			src := c.LocalAddr().(*net.TCPAddr).AddrPort()
			if rec := a.flowOf(t, src); !slices.Contains(tc.wantA, rec.Flag) {
				t.Errorf("node-a recorded %s (%v), want one of %s", rec.Flag, rec.Err, tc.wantA)
			}
			if rec := b.flowOf(t, src); !slices.Contains(tc.wantB, rec.Flag) {
				t.Errorf("node-b recorded %s (%v), want one of %s", rec.Flag, rec.Err, tc.wantB)
			}
		})
	}
}
