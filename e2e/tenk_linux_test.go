package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// Issue 9's scale target: tenKConns connections from one pod to one pod
// on another node, through both agents.
const (
	tenKConns = 10_000
	// tenKMaxRSS is the most an agent may hold with the connections open
	// and idle.
	tenKMaxRSS = 150 << 20
	// tenKIdle is how long the connections are idle before the agents'
	// memory is taken: an agent collects and releases memory once its
	// load (open flows and HBONE connections) moved by what holds 1 MiB
	// and held steady for 2 s (node's releaser); before, it holds the
	// garbage of the connections' setup too.
	tenKIdle = 5 * time.Second
	// tenKSettle is how long after the connections closed the agents must
	// be back within 10% of their idle size (the requirement itself).
	tenKSettle = 30 * time.Second
	// tenKKeptAnon is how much more anonymous memory (the heap, stacks
	// and the runtime's metadata, not the executable's pages) an agent
	// may hold 30 s after the connections closed than when idle. Go keeps
	// some for good after a heap of 40 MB: span and GC metadata (about
	// 0.9 MB), spans that a few live objects keep in use, stacks that its
	// processors cache and of the threads it started; with the flow
	// events that the ring now holds (0.4 MB), 1.7-2.6 MiB was measured
	// (docs/performance.md, "After the connections close"). A record of
	// Go's poller kept for every flow (560 B, 5.6 MB here), a goroutine
	// per flow, or spare HBONE connections whose memory was not given
	// back (4.6-6.1 MiB kept at 400 streams a connection) fail it. The
	// resident size may exceed 10% of idle by as much: it was within 10%
	// in every measurement since (and in 11 of 12 before), but the
	// executable's pages mapped 30 s after (most often fewer than idle's,
	// after the release) vary from run to run by 1-6 MiB, so a bound of
	// 10% alone would fail now and then.
	tenKKeptAnon = 4 << 20
	// tenKBurstGrowth is how much more anonymous memory an agent may hold
	// after a second burst than after the first: what Go keeps is its
	// peak's, which the second burst does not raise. −0.5 to +0.3 MiB was
	// measured; with Go's heap profiler on, 0.1-0.4 MiB more came with
	// each burst (its records of the stacks it sampled).
	tenKBurstGrowth = 1 << 20
)

// TestTenThousandConnectionsFromOnePodToOnePod opens 10,000 connections
// from the client pod (node1) to the server pod (node2), each echoing one
// byte and then left open and idle: every one must succeed, neither agent
// may hold more than 150 MiB resident meanwhile, and 30 s after the
// connections closed each agent's anonymous memory must be within what
// Go's runtime never gives back of its idle size (tenKKeptAnon), and its
// resident size within 10% of idle plus that. A second burst the same
// must leave each agent where the first did (tenKBurstGrowth). It moves
// 40,000 bytes in all.
func TestTenThousandConnectionsFromOnePodToOnePod(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server"}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{
		// A line per flow at debug level is 20,000 lines of work for
		// nothing here. The default per-pod bound is a quarter of the
		// descriptor budget, 5,000 at an open-file limit of 20,000.
		AgentArgs: []string{"--log-level", "info", "--max-outbound-per-pod", strconv.Itoa(tenKConns + 100)},
	})
	srv := startOneByteServer(t, m, "server", appPort)
	dst := netip.AddrPortFrom(m.Pod("server").IP, appPort)
	nodes := []string{"node1", "node2"}
	pids := map[string]int{}
	var err error
	for _, n := range nodes {
		if pids[n], err = m.AgentPID(n); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 240*time.Second)
	defer cancel()

	// Warm up the code paths and the HBONE pool, then take the agents'
	// idle size as the size after the connections is taken: tenKSettle
	// after the last change. An agent drops the pages of its executable
	// that its start used once it has settled (node's releaseOnceSettled),
	// and they come back over the next seconds as its idle work (the
	// collector's stack scans, the data path's checks) touches them: taken
	// at once, the idle size would miss what any idle agent holds half a
	// minute on (about 4 MiB of 20).
	warm, err := openConns(ctx, m, "client", dst, 16)
	if err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	closeConns(warm)
	waitServerConns(t, ctx, srv, 0)
	time.Sleep(tenKSettle)
	idle := map[string]memStatus{}
	for _, n := range nodes {
		idle[n] = memOf(t, pids[n])
	}

	first := tenKBurst(t, ctx, m, srv, dst, nodes, pids)
	for _, n := range nodes {
		b := first[n]
		t.Logf("%s's agent: %.1f MiB idle (%.1f anonymous), %.1f MiB with %d connections (%.1f KiB each), %.1f MiB (%.1f anonymous) %v after they closed; %d connections opened in %v",
			n, mib(idle[n].rss), mib(idle[n].anon), mib(b.loaded.rss), tenKConns, float64(b.loaded.rss-idle[n].rss)/tenKConns/1024,
			mib(b.after.rss), mib(b.after.anon), tenKSettle, tenKConns, b.opened.Round(time.Millisecond))
		if limit := idle[n].rss + idle[n].rss/10 + tenKKeptAnon; b.after.rss > limit {
			t.Errorf("%s's agent holds %.1f MiB resident %v after the connections closed, want at most %.1f MiB (idle %.1f MiB, plus 10%%, plus %.0f MiB that Go keeps); %s",
				n, mib(b.after.rss), tenKSettle, mib(limit), mib(idle[n].rss), mib(tenKKeptAnon), goMemory(m, n))
		}
		if limit := idle[n].anon + tenKKeptAnon; b.after.anon > limit {
			t.Errorf("%s's agent holds %.1f MiB of anonymous memory %v after the connections closed, want at most %.1f MiB (idle %.1f MiB, plus %.0f MiB that Go keeps); %s",
				n, mib(b.after.anon), tenKSettle, mib(limit), mib(idle[n].anon), mib(tenKKeptAnon), goMemory(m, n))
		}
	}
	if t.Failed() {
		return
	}

	second := tenKBurst(t, ctx, m, srv, dst, nodes, pids)
	for _, n := range nodes {
		a, b := first[n].after, second[n].after
		t.Logf("%s's agent after a second burst: %.1f MiB (%.1f anonymous), %+.1f%% of idle", n, mib(b.rss), mib(b.anon), 100*float64(b.rss-idle[n].rss)/float64(idle[n].rss))
		if limit := a.anon + tenKBurstGrowth; b.anon > limit {
			t.Errorf("%s's agent holds %.1f MiB of anonymous memory %v after a second burst closed, want at most %.1f MiB (%.1f MiB after the first, plus %.0f MiB)",
				n, mib(b.anon), tenKSettle, mib(limit), mib(a.anon), mib(tenKBurstGrowth))
		}
	}
}

// tenKMemory is an agent's memory in a burst: with its connections open
// and idle, and tenKSettle after they closed.
type tenKMemory struct {
	loaded, after memStatus
	opened        time.Duration // how long the burst's connections took to open
}

// tenKBurst opens tenKConns connections from the client pod to dst (the
// server srv), leaves them idle for tenKIdle, closes them and waits
// tenKSettle: every connection must succeed, and no agent may hold more
// than tenKMaxRSS meanwhile. It returns each node's agent's memory.
func tenKBurst(t *testing.T, ctx context.Context, m *meshtest.Mesh, srv *oneByteServer, dst netip.AddrPort, nodes []string, pids map[string]int) map[string]tenKMemory {
	t.Helper()
	start := time.Now()
	conns, err := openConns(ctx, m, "client", dst, tenKConns)
	t.Cleanup(func() { closeConns(conns) })
	if err != nil {
		t.Fatalf("%d of %d connections from client to server failed, the first: %v", tenKConns-len(conns), tenKConns, err)
	}
	opened := time.Since(start)
	waitServerConns(t, ctx, srv, tenKConns)
	time.Sleep(tenKIdle)
	mem := map[string]tenKMemory{}
	for _, n := range nodes {
		loaded := memOf(t, pids[n])
		if loaded.rss > tenKMaxRSS {
			t.Errorf("%s's agent holds %.1f MiB resident with %d idle connections, want at most %d MiB", n, mib(loaded.rss), tenKConns, tenKMaxRSS>>20)
		}
		mem[n] = tenKMemory{loaded: loaded, opened: opened}
	}

	closeConns(conns)
	closed := time.Now()
	conns = nil
	waitServerConns(t, ctx, srv, 0)
	time.Sleep(time.Until(closed.Add(tenKSettle)))
	for _, n := range nodes {
		b := mem[n]
		b.after = memOf(t, pids[n])
		mem[n] = b
	}
	return mem
}

// goMemory describes where node's agent's memory is, by its Go metrics.
func goMemory(m *meshtest.Mesh, node string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ms, err := m.Metrics(ctx, node)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	b.WriteString("its Go metrics:")
	for _, name := range []string{"go_goroutines", "go_memstats_heap_alloc_bytes", "go_memstats_heap_inuse_bytes",
		"go_memstats_stack_inuse_bytes", "go_memstats_other_sys_bytes", "go_memstats_gc_sys_bytes"} {
		for _, s := range ms.Series(name, nil) {
			fmt.Fprintf(&b, " %s=%.0f", name, s.Value)
		}
	}
	return b.String()
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// memStatus is a process's resident memory, in bytes: all of it, and its
// anonymous part (heap and stacks, not the executable's pages).
type memStatus struct{ rss, anon int64 }

// memOf returns the resident memory of process pid.
func memOf(t *testing.T, pid int) memStatus {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("agent's memory: %v", err)
	}
	var ms memStatus
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		for _, f := range []struct {
			prefix string
			to     *int64
		}{{"VmRSS:", &ms.rss}, {"RssAnon:", &ms.anon}} {
			v, ok := strings.CutPrefix(line, f.prefix)
			if !ok {
				continue
			}
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("%s of %d: %q: %v", f.prefix, pid, v, err)
			}
			*f.to = kb << 10
			found++
		}
	}
	if found != 2 {
		t.Fatalf("no VmRSS or RssAnon in /proc/%d/status", pid)
	}
	return ms
}

// openConns opens n connections from pod to dst, 64 at a time, each
// echoing one byte. It returns those that succeeded, and the first
// error if any failed.
func openConns(ctx context.Context, m *meshtest.Mesh, pod string, dst netip.AddrPort, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c, err := oneByteConn(ctx, m, pod, dst)
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("connection %d: %w", i, err) })
					continue
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	ok := conns[:0]
	for _, c := range conns {
		if c != nil {
			ok = append(ok, c)
		}
	}
	return ok, firstErr
}

func oneByteConn(ctx context.Context, m *meshtest.Mesh, pod string, dst netip.AddrPort) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	c, err := m.Dial(dctx, pod, dst)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	var one [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		c.Close()
		return nil, fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("read the echo: %w", err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

func closeConns(cs []net.Conn) {
	for _, c := range cs {
		c.Close()
	}
}

// oneByteServerEnv, set to an address, makes the test binary a
// oneByteServer on that address (TestOneByteServerProcess): the test
// process cannot hold both ends of 10,000 connections within its
// open-file limit.
const oneByteServerEnv = "MANTLET_E2E_ONE_BYTE_SERVER"

// TestOneByteServerProcess is the server of
// TestTenThousandConnectionsFromOnePodToOnePod when run as its child
// process; otherwise it does nothing. It listens on $MANTLET_E2E_ONE_BYTE_SERVER,
// echoes the first byte of each connection, then waits for the client's
// end and closes (no buffer per connection). It prints "open N" when the
// count of open connections changed, at most every 50 ms, and exits when
// its standard input closes.
func TestOneByteServerProcess(t *testing.T) {
	addr := os.Getenv(oneByteServerEnv)
	if addr == "" {
		return
	}
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	var open atomic.Int64
	go func() {
		last := int64(-1)
		for range time.Tick(50 * time.Millisecond) {
			if n := open.Load(); n != last {
				fmt.Printf("open %d\n", n)
				last = n
			}
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			time.Sleep(10 * time.Millisecond) // EMFILE and the like: the client sees its connection fail
			continue
		}
		open.Add(1)
		go func() {
			defer func() {
				c.Close()
				open.Add(-1)
			}()
			var one [1]byte
			if _, err := io.ReadFull(c, one[:]); err != nil {
				return
			}
			if _, err := c.Write(one[:]); err != nil {
				return
			}
			for {
				if _, err := c.Read(one[:]); err != nil {
					return
				}
			}
		}()
	}
}

// oneByteServer is a TestOneByteServerProcess running in a pod.
type oneByteServer struct{ open atomic.Int64 }

// startOneByteServer runs TestOneByteServerProcess in pod on port until
// the test ends.
func startOneByteServer(t *testing.T, m *meshtest.Mesh, pod string, port uint16) *oneByteServer {
	t.Helper()
	p := m.Pod(pod)
	cmd := p.Command(context.Background(), os.Args[0], "-test.run=^TestOneByteServerProcess$")
	cmd.Env = append(os.Environ(), oneByteServerEnv+"="+netip.AddrPortFrom(p.IP, port).String(), meshtest.BinaryEnv+"="+binary)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the server in %s: %v", pod, err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	s := &oneByteServer{}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			if line == "ready" {
				close(ready)
			}
			if v, ok := strings.CutPrefix(line, "open "); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				s.open.Store(n)
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(20 * time.Second):
		t.Fatalf("the server in %s did not start", pod)
	}
	return s
}

// waitServerConns waits until the server has n connections open.
func waitServerConns(t *testing.T, ctx context.Context, s *oneByteServer, n int64) {
	t.Helper()
	for s.open.Load() != n {
		if ctx.Err() != nil {
			t.Fatalf("the server has %d connections open, want %d", s.open.Load(), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
