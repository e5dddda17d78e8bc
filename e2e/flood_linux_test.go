package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// The flood: 24 addresses on the underlay bridge, 160 workers each, each
// holding one idle connection to the server pod's HBONE port and opening
// the next once the ztunnel closed it, at most one attempt per 400 µs
// and 50,000 in all. The agents run with an open-file limit of 2048.
const (
	floodSources      = 24
	floodWorkersPerIP = 160 // above the per-IP limit of 128
	floodPace         = 400 * time.Microsecond
	floodMaxAttempts  = 50000
	agentFileLimit    = 2048
	handshakeTimeout  = 2 * time.Second
	// Each kind of legitimate connection is tried at least legitAttempts
	// times, and on until the flood has lasted floodMinTime (at most
	// legitMaxAttempts times).
	legitAttempts    = 200
	legitMaxAttempts = 3000
	floodMinTime     = 8 * time.Second
)

// TestHBONEFloodFromTheUnderlayLeavesLegitimateTrafficAlone floods the
// HBONE port of a meshed pod on node2 from the underlay (no certificate,
// as anyone on the nodes' network could) with idle connections, until
// node2's agent refuses them to keep its descriptor reserve. Meanwhile
// four kinds of legitimate connections, 200 each, must succeed at least
// 99% of the time: into node2 through node1's ztunnel, into node2 with a
// new HBONE handshake each, out of node2 to node1, and between two pods
// of node2. The refusals are counted, their log lines stay within the
// rate limit, node2's agent never runs out of descriptors, and once the
// flood stops no handshake stays pending.
func TestHBONEFloodFromTheUnderlayLeavesLegitimateTrafficAlone(t *testing.T) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) runs the agents with a lower open-file limit: %v", err)
	}
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server"},
				{Name: "neighbour", Namespace: "shop", ServiceAccount: "neighbour"},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{
		Binary:     prlimit,
		BinaryArgs: []string{fmt.Sprintf("--nofile=%d:%d", agentFileLimit, agentFileLimit), "--", binary},
		AgentArgs:  []string{"--hbone-handshake-timeout", handshakeTimeout.String()},
	})
	srv := echo(t, m, "server", appPort)
	cli := echo(t, m, "client", appPort)
	server := m.Pod("server")
	hboneAddr := netip.AddrPortFrom(server.IP, meshtest.HBONEPort)
	pid, err := m.AgentPID("node2")
	if err != nil {
		t.Fatal(err)
	}
	fds := watchDescriptors(t, pid)

	srcs := underlayAddrs(t, m, floodSources, m.Node("node2"))
	before := scrape(t, m, "node2")
	budget, _ := before.Value("mantlet_ztunnel_descriptors_budget", map[string]string{})
	reserve, _ := before.Value("mantlet_ztunnel_descriptors_reserved", map[string]string{})
	t.Logf("node2's agent: open-file limit %d, budget %v descriptors, %v reserved", agentFileLimit, budget, reserve)
	if budget == 0 || reserve == 0 {
		t.Fatalf("node2 exports no descriptor budget (%v) or reserve (%v)", budget, reserve)
	}

	floodStart := time.Now()
	f := startUnderlayFlood(t, m, srcs, hboneAddr)
	refused := func() (pending, fd, src float64) {
		mfs := scrape(t, m, "node2")
		flag := func(name string) float64 {
			v, _ := mfs.Value("mantlet_ztunnel_refused_connections_total", map[string]string{"response_flags": name})
			return v
		}
		return flag("pending_limit"), flag("fd_reserve"), flag("source_limit")
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		pend, fd, _ := refused()
		if pend+fd > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the flood did not reach node2's limits within 60 s: %d attempts, %d held", f.attempts.Load(), f.held.Load())
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("node2 at its limit after %v: %d attempts, %d connections held", time.Since(floodStart).Round(time.Millisecond), f.attempts.Load(), f.held.Load())

	clientID, _ := m.ID("client")
	serverID, _ := m.ID("server")
	svidCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	svid, err := m.IssueSVID(svidCtx, clientID)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	kinds := []struct {
		name string
		try  func(ctx context.Context, msg string) error
	}{
		{"into node2 through node1's ztunnel", func(ctx context.Context, msg string) error { return echoOnce(ctx, m, "client", srv.Addr, msg) }},
		{"into node2, a new HBONE handshake each", func(ctx context.Context, msg string) error {
			return freshHBONE(ctx, m.Node("node1"), svid, m, serverID, srv.Addr, msg)
		}},
		{"out of node2", func(ctx context.Context, msg string) error { return echoOnce(ctx, m, "server", cli.Addr, msg) }},
		{"within node2", func(ctx context.Context, msg string) error { return echoOnce(ctx, m, "neighbour", srv.Addr, msg) }},
	}
	failures := make([][]string, len(kinds))
	tries := make([]int, len(kinds))
	var wg sync.WaitGroup
	for i, k := range kinds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < legitMaxAttempts && (n < legitAttempts || time.Since(floodStart) < floodMinTime); n++ {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				if err := k.try(ctx, fmt.Sprintf("%s #%d", k.name, n)); err != nil {
					failures[i] = append(failures[i], fmt.Sprintf("#%d: %v", n, err))
				}
				cancel()
				tries[i]++
			}
		}()
	}
	wg.Wait()
	pend, fd, src := refused()
	attempts := f.attempts.Load()
	f.stop()
	floodTime := time.Since(floodStart)

	for i, k := range kinds {
		ok := tries[i] - len(failures[i])
		t.Logf("%s: %d of %d succeeded (%.2f%%)", k.name, ok, tries[i], 100*float64(ok)/float64(tries[i]))
		if ok*100 < tries[i]*99 {
			t.Errorf("%s: %d of %d failed during the flood, want at most 1%%: %s", k.name, len(failures[i]), tries[i], strings.Join(failures[i][:min(len(failures[i]), 10)], "; "))
		}
	}
	t.Logf("flood: %d connection attempts in %v from %d addresses, at most %d held at once; node2 refused %v for the reserve, %v at the pending limit, %v at the per-IP limit",
		attempts, floodTime.Round(time.Millisecond), len(srcs), f.maxHeld.Load(), fd, pend, src)

	// Counted, and logged within the rate: 10 lines a second, bursts of
	// 50, plus summaries.
	mfs := scrape(t, m, "node2")
	for _, node := range []string{"node1", "node2"} {
		mfs := scrape(t, m, node)
		for _, flag := range []string{"accept_failed", "connect_failed", "hbone_connect_failed"} {
			if v, _ := mfs.Value("mantlet_ztunnel_refused_connections_total", map[string]string{"response_flags": flag}); v > 0 {
				t.Errorf("%s counted %v connections %s", node, v, flag)
			}
		}
	}
	var refusals float64
	for _, mt := range mfs["mantlet_ztunnel_refused_connections_total"].GetMetric() {
		refusals += mt.GetCounter().GetValue()
	}
	if v, _ := mfs.Value("mantlet_ztunnel_refused_connections_total", map[string]string{"response_flags": "tls_handshake_timeout"}); v == 0 {
		t.Errorf("node2 counted no handshake timeouts in a flood of idle connections that lasted %v", floodTime)
	}
	// The summary of suppressed lines comes within 5 s of the first one
	// suppressed after the last summary.
	var lines, summaries int
	var suppressed float64
	deadline = time.Now().Add(15 * time.Second)
	for {
		lines, summaries, suppressed = 0, 0, 0
		for _, r := range m.Records("node2") {
			switch r["msg"] {
			case "ztunnel: refused", "ztunnel: accept failed":
				lines++
			case "ztunnel: more refusals not logged":
				summaries++
				n, _ := r["suppressed"].(float64)
				suppressed += n
			}
		}
		if summaries > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	logTime := time.Since(floodStart)
	// 10 lines a second with bursts of 50.
	bound := 50 + int(10*logTime.Seconds()+1)
	t.Logf("node2 logged %d refusal lines and %d summaries (%v lines suppressed) in %v, for %v refusals", lines, summaries, suppressed,
		logTime.Round(time.Millisecond), refusals)
	if lines > bound {
		t.Errorf("node2 logged %d refusal lines in %v, want at most %d", lines, logTime, bound)
	}
	if summaries == 0 || suppressed == 0 {
		t.Errorf("node2 wrote %d summaries of suppressed refusal lines (%v suppressed), want some", summaries, suppressed)
	}

	peak := fds.stop()
	t.Logf("node2's agent held at most %d descriptors (limit %d)", peak, agentFileLimit)
	if peak >= agentFileLimit {
		t.Errorf("node2's agent reached %d descriptors, its limit is %d", peak, agentFileLimit)
	}

	// Once the flood stopped, every pending handshake ends.
	deadline = time.Now().Add(20 * time.Second)
	for {
		v, _ := scrape(t, m, "node2").Value("mantlet_ztunnel_pending_handshakes", map[string]string{})
		if v == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v handshakes still pending 20 s after the flood stopped", v)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// echoOnce opens a new connection from pod to addr, echoes msg and closes.
func echoOnce(ctx context.Context, m *meshtest.Mesh, pod string, addr netip.AddrPort, msg string) error {
	c, err := m.Dial(ctx, pod, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	return echoed(c, msg)
}

func echoed(rw io.ReadWriter, msg string) error {
	if _, err := io.WriteString(rw, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(rw, buf); err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// freshHBONE connects from node's namespace to dst's HBONE port with a
// new TLS handshake, as a peer ztunnel's pool does when it opens a
// connection, and echoes msg through a CONNECT to dst.
func freshHBONE(ctx context.Context, node *testbed.Node, svid *x509svid.SVID, m *meshtest.Mesh, dstID spiffeid.ID, dst netip.AddrPort, msg string) error {
	pool := hbone.NewPool(hbone.PoolConfig{
		SVID:    func(context.Context, spiffeid.ID) (*x509svid.SVID, error) { return svid, nil },
		Bundles: m.Bundle(),
		Dial: func(ctx context.Context, _ netip.Addr, to netip.AddrPort) (net.Conn, error) {
			return node.Dial(ctx, "tcp4", to.String())
		},
	})
	defer pool.Close()
	cs, err := pool.Connect(ctx, &hbone.Request{
		Key:    hbone.Key{Src: svid.ID, Dst: dstID, DstIP: dst.Addr()},
		Addr:   netip.AddrPortFrom(dst.Addr(), meshtest.HBONEPort),
		Target: dst,
		Body:   strings.NewReader(msg),
	})
	if err != nil {
		return err
	}
	defer cs.Close()
	got, err := io.ReadAll(cs)
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if string(got) != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// underlayAddrs puts n addresses of the nodes' subnet (from .200) on the
// underlay bridge, with a route to the pods of to, and returns them: the
// flood's sources, on the nodes' own network. They go with the testbed.
func underlayAddrs(t *testing.T, m *meshtest.Mesh, n int, to *testbed.Node) []netip.Addr {
	t.Helper()
	h, err := netns.GetFromPath(m.TB.Underlay())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	br, err := nl.LinkByName(testbed.BridgeName)
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for i := range n {
		ip := netip.AddrFrom4([4]byte{198, 18, 0, byte(200 + i)})
		if err := nl.AddrAdd(br, &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(testbed.NodeCIDR.Bits(), 32)}}); err != nil {
			t.Fatalf("address %s on the underlay: %v", ip, err)
		}
		out = append(out, ip)
	}
	pods := to.PodCIDR
	if err := nl.RouteAdd(&netlink.Route{LinkIndex: br.Attrs().Index, Dst: &net.IPNet{IP: pods.Addr().AsSlice(), Mask: net.CIDRMask(pods.Bits(), 32)},
		Gw: to.IP.AsSlice()}); err != nil {
		t.Fatalf("route to %s via %s on the underlay: %v", pods, to.IP, err)
	}
	return out
}

// underlayFlood is a flood from the underlay's namespace (see the
// constants above). Sockets are made by a few goroutines locked into the
// namespace for the flood's life; the workers that hold the connections
// are ordinary ones.
type underlayFlood struct {
	attempts, held, maxHeld atomic.Int64
	cancel                  context.CancelFunc
	wg                      sync.WaitGroup
	mu                      sync.Mutex
	conns                   map[net.Conn]struct{}
}

type dialReq struct {
	src   netip.Addr
	reply chan net.Conn
}

func startUnderlayFlood(t *testing.T, m *meshtest.Mesh, srcs []netip.Addr, dst netip.AddrPort) *underlayFlood {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &underlayFlood{cancel: cancel, conns: map[net.Conn]struct{}{}}
	reqs := make(chan dialReq)
	h, err := netns.GetFromPath(m.TB.Underlay())
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 8)
	for range 8 {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			// The thread goes back to its namespace before it is
			// unlocked. It must not die locked: the agents were started
			// from some of the process's threads, and die with them
			// (meshtest's parent-death signal).
			runtime.LockOSThread()
			orig, err := netns.Get()
			if err != nil {
				runtime.UnlockOSThread()
				started <- err
				return
			}
			defer orig.Close()
			if err := netns.Set(h); err != nil {
				runtime.UnlockOSThread()
				started <- err
				return
			}
			defer func() {
				if netns.Set(orig) == nil {
					runtime.UnlockOSThread()
				} // else the thread stays locked and ends with the goroutine
			}()
			started <- nil
			for {
				select {
				case r := <-reqs:
					d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(r.src, 0)), Timeout: 2 * time.Second}
					c, err := d.DialContext(ctx, "tcp4", dst.String())
					if err != nil {
						c = nil
					}
					r.reply <- c
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	for range 8 {
		if err := <-started; err != nil {
			cancel()
			h.Close()
			t.Fatalf("enter the underlay's namespace: %v", err)
		}
	}
	h.Close()
	tick := time.NewTicker(floodPace)
	for _, src := range srcs {
		for range floodWorkersPerIP {
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				reply := make(chan net.Conn, 1)
				buf := make([]byte, 1)
				for f.attempts.Add(1) <= floodMaxAttempts {
					select {
					case <-tick.C:
					case <-ctx.Done():
						return
					}
					select {
					case reqs <- dialReq{src: src, reply: reply}:
					case <-ctx.Done():
						return
					}
					c := <-reply
					if c == nil {
						continue
					}
					if !f.track(ctx, c) {
						c.Close()
						return
					}
					_, _ = c.Read(buf) // idle until the ztunnel (or stop) closes it
					f.untrack(c)
				}
			}()
		}
	}
	t.Cleanup(func() { f.stop(); tick.Stop() })
	return f
}

func (f *underlayFlood) track(ctx context.Context, c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ctx.Err() != nil {
		return false
	}
	f.conns[c] = struct{}{}
	n := f.held.Add(1)
	if n > f.maxHeld.Load() {
		f.maxHeld.Store(n)
	}
	return true
}

func (f *underlayFlood) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.held.Add(-1)
	f.mu.Unlock()
	c.Close()
}

// stop ends the flood and closes its connections; it may be called twice.
func (f *underlayFlood) stop() {
	f.cancel()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// descriptorWatch samples a process's open descriptors.
type descriptorWatch struct {
	peak atomic.Int64
	done chan struct{}
	wg   sync.WaitGroup
}

// watchDescriptors counts pid's open descriptors every 50 ms until stop,
// which returns the most it saw.
func watchDescriptors(t *testing.T, pid int) *descriptorWatch {
	w := &descriptorWatch{done: make(chan struct{})}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if ents, err := os.ReadDir(dir); err == nil && int64(len(ents)) > w.peak.Load() {
				w.peak.Store(int64(len(ents)))
			} else if err != nil && !errors.Is(err, os.ErrNotExist) {
				return
			}
			select {
			case <-tick.C:
			case <-w.done:
				return
			}
		}
	}()
	t.Cleanup(func() { w.stop() })
	return w
}

func (w *descriptorWatch) stop() int {
	select {
	case <-w.done:
	default:
		close(w.done)
	}
	w.wg.Wait()
	return int(w.peak.Load())
}
