package meshtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"

	"github.com/mantlet/mantlet/internal/testbed"
)

// maxEchoConns bounds an echo server's open connections; more are closed
// at once.
const maxEchoConns = 1024

// Echo is a TCP echo server in a pod: it writes back everything it reads,
// closes its sending side when the client closes its own (so both
// directions of a half-close can be observed), and records the address of
// every client it accepted.
type Echo struct {
	// Addr is the server's address: the pod's IP and the port.
	Addr netip.AddrPort

	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
	peers []netip.AddrPort
}

// Echo starts an echo server on port of pod until Close.
func (m *Mesh) Echo(ctx context.Context, pod string, port uint16) (*Echo, error) {
	p := m.TB.Pod(pod)
	if p == nil {
		return nil, fmt.Errorf("meshtest: no pod %q", pod)
	}
	return StartEcho(ctx, p, port)
}

// StartEcho starts an echo server on port of pod until Close.
func StartEcho(ctx context.Context, pod *testbed.Pod, port uint16) (*Echo, error) {
	ln, err := pod.Listen(ctx, "tcp4", net.JoinHostPort(pod.IP.String(), strconv.Itoa(int(port))))
	if err != nil {
		return nil, fmt.Errorf("meshtest: echo in %s: %w", pod.Name, err)
	}
	e := &Echo{Addr: netip.AddrPortFrom(pod.IP, port), ln: ln, conns: map[net.Conn]bool{}}
	e.wg.Add(1)
	go e.serve()
	return e, nil
}

func (e *Echo) serve() {
	defer e.wg.Done()
	for {
		c, err := e.ln.Accept()
		if err != nil {
			return
		}
		e.mu.Lock()
		if len(e.conns) >= maxEchoConns {
			e.mu.Unlock()
			c.Close()
			continue
		}
		e.conns[c] = true
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
			e.peers = append(e.peers, ap)
			if len(e.peers) > maxEchoConns {
				e.peers = e.peers[len(e.peers)-maxEchoConns:]
			}
		}
		e.mu.Unlock()
		e.wg.Add(1)
		go e.handle(c)
	}
}

func (e *Echo) handle(c net.Conn) {
	defer e.wg.Done()
	defer func() {
		e.mu.Lock()
		delete(e.conns, c)
		e.mu.Unlock()
		c.Close()
	}()
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		// Wait for the client to close too, so the server's FIN is not
		// followed by a reset.
		_, _ = io.Copy(io.Discard, c)
	}
}

// Peers returns the remote addresses of the connections the server
// accepted, oldest first (at most the last 1024).
func (e *Echo) Peers() []netip.AddrPort {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]netip.AddrPort(nil), e.peers...)
}

// Close stops the server and closes its open connections.
func (e *Echo) Close() error {
	err := e.ln.Close()
	e.mu.Lock()
	for c := range e.conns {
		c.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Dial connects from pod to addr, inside the pod's namespace (so from the
// pod's IP).
func (m *Mesh) Dial(ctx context.Context, pod string, addr netip.AddrPort) (net.Conn, error) {
	p := m.TB.Pod(pod)
	if p == nil {
		return nil, fmt.Errorf("meshtest: no pod %q", pod)
	}
	c, err := p.Dial(ctx, "tcp4", addr.String())
	if err != nil {
		return nil, fmt.Errorf("meshtest: dial %s from %s: %w", addr, pod, err)
	}
	return c, nil
}

// Listen listens on port of pod's IP, inside the pod's namespace.
func (m *Mesh) Listen(ctx context.Context, pod string, port uint16) (net.Listener, error) {
	p := m.TB.Pod(pod)
	if p == nil {
		return nil, fmt.Errorf("meshtest: no pod %q", pod)
	}
	ln, err := p.Listen(ctx, "tcp4", net.JoinHostPort(p.IP.String(), strconv.Itoa(int(port))))
	if err != nil {
		return nil, fmt.Errorf("meshtest: listen on %s:%d: %w", pod, port, err)
	}
	return ln, nil
}
