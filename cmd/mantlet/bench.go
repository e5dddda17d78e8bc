package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

func init() {
	register(command{name: "bench", summary: "measure pod-to-pod traffic on the testbed, direct vs through mantlet (root)", run: runBench})
}

const benchSynopsis = `[--quick] [--duration 15s] [--round-trips 10000] [--conn-duration 15s] [flags]

Builds a two-node testbed with an agent per node and measures, in the same
run, traffic from a pod of node1 to a pod of node2 in two ways: direct (the
pods' namespace is not meshed) and through mantlet (meshed: eBPF capture,
HBONE over mutual TLS 1.3 between the nodes' ztunnels). It prints a table:
throughput of one stream, 1-byte echo latency p50 and p99 on one connection,
new connections per second (connect, 1 byte each way, close), and the
ztunnels' CPU seconds per GB moved (both agents' utime+stime from /proc
during the throughput phase). The traffic is made in Go inside the pods'
network namespaces. The default run takes about a minute. Needs root.`

// The bench's cluster and its server.
const (
	benchMeshNS  = "bench"
	benchPlainNS = "direct"
	benchPort    = 5201
	// benchMaxServerConns bounds the connections a bench server holds.
	benchMaxServerConns = 256
	benchChunk          = 256 << 10
	benchIOTimeout      = 30 * time.Second
	benchWarmupRTs      = 100
	// clockTicks is USER_HZ, the unit of utime and stime in /proc (100 on
	// every Linux architecture Go supports).
	clockTicks = 100
)

// Modes of a bench connection: its first byte.
const (
	modeSink    = 's' // count bytes until EOF, answer the count (8 bytes, big-endian)
	modeEcho    = 'e' // echo every byte until EOF
	modeConnect = 'c' // answer one byte and close (the server closes first, so the client keeps no TIME_WAIT)
)

type benchFlags struct {
	quick        bool
	duration     time.Duration
	roundTrips   int
	connDuration time.Duration
	maxConns     int
	binary       string
}

func runBench(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "bench", benchSynopsis)
	f := benchFlags{}
	fs.BoolVar(&f.quick, "quick", false, "a short run (1 s phases, 1000 round trips) to check that it works, not for numbers")
	fs.DurationVar(&f.duration, "duration", 15*time.Second, "how long each throughput measurement sends")
	fs.IntVar(&f.roundTrips, "round-trips", 10000, "1-byte echo round trips per latency measurement")
	fs.DurationVar(&f.connDuration, "conn-duration", 15*time.Second, "how long each new-connections measurement runs")
	fs.IntVar(&f.maxConns, "max-conns", 200000, "at most this many connections per new-connections measurement")
	fs.StringVar(&f.binary, "binary", "", "mantlet executable that runs the agents (default: this one)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet bench: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	if f.quick {
		set := map[string]bool{}
		fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
		if !set["duration"] {
			f.duration = time.Second
		}
		if !set["round-trips"] {
			f.roundTrips = 1000
		}
		if !set["conn-duration"] {
			f.connDuration = time.Second
		}
	}
	if f.duration <= 0 || f.connDuration <= 0 || f.roundTrips < 1 || f.maxConns < 1 {
		fmt.Fprintln(e.stderr, "mantlet bench: durations, --round-trips and --max-conns must be positive")
		return errUsage
	}
	bin, err := scenarioBinary("bench", f.binary)
	if err != nil {
		return err
	}
	f.binary = bin
	return bench(ctx, e, f)
}

func benchSpec() testbed.Spec {
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "mesh-client", Namespace: benchMeshNS, ServiceAccount: "client"},
				{Name: "direct-client", Namespace: benchPlainNS},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "mesh-server", Namespace: benchMeshNS, ServiceAccount: "server"},
				{Name: "direct-server", Namespace: benchPlainNS},
			}},
		},
		Namespaces: map[string]map[string]string{benchMeshNS: {meshtest.MeshAnnotation: "enabled"}},
	}
}

// benchPath is one way from a client pod to a server pod.
type benchPath struct {
	name   string
	client *testbed.Pod
	server netip.AddrPort
}

// benchResult holds the measurements of one path.
type benchResult struct {
	bytes      int64
	elapsed    time.Duration
	cpu        time.Duration // both agents, during the throughput phase
	p50, p99   time.Duration
	conns      int
	connTime   time.Duration
	captured   uint64 // connections node1's ztunnel accepted from the client during the phases
	attempted  int    // connections the client opened
	throughput float64
}

func (r *benchResult) cpuPerGB() float64 {
	if r.bytes == 0 {
		return 0
	}
	return r.cpu.Seconds() / (float64(r.bytes) / 1e9)
}

func (r *benchResult) connsPerSecond() float64 {
	if r.connTime <= 0 {
		return 0
	}
	return float64(r.conns) / r.connTime.Seconds()
}

func bench(ctx context.Context, e *env, f benchFlags) (err error) {
	w := e.stdout
	progress := func(format string, args ...any) { fmt.Fprintf(e.stderr, "bench: "+format+"\n", args...) }
	prefix := "bench" + randomToken(3)
	progress("starting a two-node mesh (testbed %s)", prefix)
	m, err := meshtest.Start(ctx, benchSpec(), meshtest.Options{
		Binary: f.binary,
		Prefix: prefix,
		// A log line per connection would be part of what is measured.
		AgentArgs: []string{"--log-level", "info"},
		Logger:    slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return demoInterrupted(ctx, fmt.Errorf("start the mesh: %w", err))
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			printAgentTails(e.stderr, m)
		}
		if cerr := m.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	var pids []int
	for _, n := range m.TB.Nodes() {
		pid, err := m.AgentPID(n.Name)
		if err != nil {
			return err
		}
		pids = append(pids, pid)
	}
	for _, name := range []string{"mesh-server", "direct-server"} {
		srv, err := startBenchServer(ctx, m.Pod(name))
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	paths := []*benchPath{
		{name: "direct", client: m.Pod("direct-client"), server: netip.AddrPortFrom(m.Pod("direct-server").IP, benchPort)},
		{name: "mantlet", client: m.Pod("mesh-client"), server: netip.AddrPortFrom(m.Pod("mesh-server").IP, benchPort)},
	}
	results := map[string]*benchResult{"direct": {}, "mantlet": {}}
	captured := func() (uint64, error) {
		c, err := m.Counters("node1")
		return c.LookupOutbound, err
	}
	// phase runs fn for each path, direct first, and records how many
	// connections node1's ztunnel took from the client meanwhile.
	phase := func(what string, fn func(p *benchPath, r *benchResult) error) error {
		for _, p := range paths {
			progress("%s, %s", what, p.name)
			before, err := captured()
			if err != nil {
				return err
			}
			if err := fn(p, results[p.name]); err != nil {
				return demoInterrupted(ctx, fmt.Errorf("%s, %s: %w", what, p.name, err))
			}
			after, err := captured()
			if err != nil {
				return err
			}
			results[p.name].captured += after - before
		}
		return nil
	}

	// Warm up: the first meshed connection fetches certificates and opens
	// the pooled HBONE connection.
	if err := phase("warm-up", func(p *benchPath, r *benchResult) error {
		r.attempted++
		_, err := benchEcho(ctx, p, 1)
		return err
	}); err != nil {
		return err
	}
	if err := phase(fmt.Sprintf("throughput for %v", f.duration), func(p *benchPath, r *benchResult) error {
		cpu0, err := processesCPU(pids)
		if err != nil {
			return err
		}
		r.attempted++
		if r.bytes, r.elapsed, err = benchThroughput(ctx, p, f.duration); err != nil {
			return err
		}
		cpu1, err := processesCPU(pids)
		if err != nil {
			return err
		}
		r.cpu = cpu1 - cpu0
		r.throughput = float64(r.bytes) / r.elapsed.Seconds()
		return nil
	}); err != nil {
		return err
	}
	if err := phase(fmt.Sprintf("%d echo round trips", f.roundTrips), func(p *benchPath, r *benchResult) error {
		r.attempted++
		rtts, err := benchEcho(ctx, p, f.roundTrips)
		if err != nil {
			return err
		}
		r.p50, r.p99 = report.Percentile(rtts, 50), report.Percentile(rtts, 99)
		return nil
	}); err != nil {
		return err
	}
	if err := phase(fmt.Sprintf("new connections for %v", f.connDuration), func(p *benchPath, r *benchResult) error {
		var err error
		r.conns, r.connTime, err = benchConnect(ctx, p, f.connDuration, f.maxConns)
		r.attempted += r.conns
		return err
	}); err != nil {
		return err
	}

	d, x := results["direct"], results["mantlet"]
	fmt.Fprintf(w, "mantlet bench: pod to pod across two nodes of a testbed, direct (unmeshed namespace) vs through mantlet (meshed: eBPF capture, HBONE, mutual TLS 1.3)\n")
	fmt.Fprintf(w, "machine: %s\n\n", machineSummary())
	t := report.NewTable("", "direct", "mantlet", "mantlet/direct")
	t.Add(fmt.Sprintf("throughput, 1 stream, %v", f.duration), report.Rate(d.throughput), report.Rate(x.throughput), report.Ratio(x.throughput, d.throughput))
	t.Add(fmt.Sprintf("echo latency p50, %d round trips", f.roundTrips), report.Duration(d.p50), report.Duration(x.p50), report.Ratio(float64(x.p50), float64(d.p50)))
	t.Add("echo latency p99", report.Duration(d.p99), report.Duration(x.p99), report.Ratio(float64(x.p99), float64(d.p99)))
	t.Add(fmt.Sprintf("new connections per second, %v", f.connDuration), report.Number(d.connsPerSecond()), report.Number(x.connsPerSecond()), report.Ratio(x.connsPerSecond(), d.connsPerSecond()))
	t.Add("ztunnel CPU seconds per GB (both nodes)", report.Number(d.cpuPerGB()), report.Number(x.cpuPerGB()), "-")
	if err := t.Write(w, "  "); err != nil {
		return err
	}
	fmt.Fprintf(w, "\n  GB = 10^9 bytes. CPU: utime+stime of both agent processes during the throughput phase (%s s of CPU for %s direct, %s s for %s through mantlet).\n",
		report.Number(d.cpu.Seconds()), report.Bytes(d.bytes), report.Number(x.cpu.Seconds()), report.Bytes(x.bytes))
	fmt.Fprintf(w, "  Captured by node1's ztunnel: %d of %d connections through mantlet, %d of %d direct.\n", x.captured, x.attempted, d.captured, d.attempted)
	// Numbers of a path that was not (or not only) what it claims to be
	// would be misleading.
	switch {
	case d.captured != 0:
		return fmt.Errorf("%d direct connections were captured by the mesh: the direct numbers are not direct", d.captured)
	case x.captured < uint64(x.attempted):
		return fmt.Errorf("only %d of %d meshed connections were captured: the mantlet numbers are not all through the mesh", x.captured, x.attempted)
	}
	return nil
}

// machineSummary describes the machine for the report.
func machineSummary() string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	load, _ := os.ReadFile("/proc/loadavg")
	fields := strings.Fields(string(load))
	la := "?"
	if len(fields) >= 3 {
		la = strings.Join(fields[:3], " ")
	}
	return fmt.Sprintf("%d CPUs, Linux %s, %s, load average %s", runtime.NumCPU(), strings.TrimSpace(string(kernel)), runtime.Version(), la)
}

// processesCPU returns the user+system CPU time the processes have used.
func processesCPU(pids []int) (time.Duration, error) {
	var total time.Duration
	for _, pid := range pids {
		d, err := processCPU(pid)
		if err != nil {
			return 0, err
		}
		total += d
	}
	return total, nil
}

// processCPU reads utime+stime (all threads) from /proc/<pid>/stat.
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of process %d: %w", pid, err)
	}
	return parseStatCPU(string(b))
}

// parseStatCPU returns utime+stime from the text of /proc/<pid>/stat.
func parseStatCPU(stat string) (time.Duration, error) {
	// The command name (field 2) is in parentheses and may hold spaces;
	// fields after it start with the state (field 3).
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu time: malformed stat %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time: stat has %d fields after the name, want at least 13", len(f))
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// benchServer serves the bench's modes in a pod.
type benchServer struct {
	ln    net.Listener
	slots chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startBenchServer(ctx context.Context, pod *testbed.Pod) (*benchServer, error) {
	ln, err := pod.Listen(ctx, "tcp4", netip.AddrPortFrom(pod.IP, benchPort).String())
	if err != nil {
		return nil, fmt.Errorf("bench server in %s: %w", pod.Name, err)
	}
	s := &benchServer{ln: ln, slots: make(chan struct{}, benchMaxServerConns), conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

func (s *benchServer) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		select {
		case s.slots <- struct{}{}:
		default:
			c.Close() // over the bound
			continue
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
				<-s.slots
			}()
			_ = serveBench(c)
		}()
	}
}

func serveBench(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Minute))
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return err
	}
	switch mode[0] {
	case modeSink:
		n, err := io.CopyBuffer(io.Discard, c, make([]byte, benchChunk))
		if err != nil {
			return err
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		_, err = c.Write(b[:])
		return err
	case modeEcho:
		_, err := io.Copy(c, c)
		return err
	case modeConnect:
		_, err := c.Write(mode[:])
		return err
	default:
		return fmt.Errorf("unknown mode %q", mode[0])
	}
}

// Close stops the server and closes its connections.
func (s *benchServer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// benchDial connects from the path's client; the connection closes when
// ctx is done.
func benchDial(ctx context.Context, p *benchPath, mode byte) (net.Conn, func(), error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.client.Dial(dctx, "tcp4", p.server.String())
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	if _, err := c.Write([]byte{mode}); err != nil {
		stop()
		c.Close()
		return nil, nil, err
	}
	return c, func() { stop(); c.Close() }, nil
}

// benchThroughput sends for d on one connection and returns the bytes the
// server received and the time until it said so.
func benchThroughput(ctx context.Context, p *benchPath, d time.Duration) (int64, time.Duration, error) {
	c, done, err := benchDial(ctx, p, modeSink)
	if err != nil {
		return 0, 0, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(d + benchIOTimeout))
	buf := make([]byte, benchChunk)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, 0, fmt.Errorf("send: %w", err)
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return 0, 0, err
		}
	}
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, 0, fmt.Errorf("read the server's count: %w", err)
	}
	return int64(binary.BigEndian.Uint64(b[:])), time.Since(start), nil
}

// benchEcho makes n 1-byte round trips on one connection (after a few
// unmeasured ones) and returns their durations.
func benchEcho(ctx context.Context, p *benchPath, n int) ([]time.Duration, error) {
	c, done, err := benchDial(ctx, p, modeEcho)
	if err != nil {
		return nil, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(benchIOTimeout + time.Duration(n)*time.Millisecond))
	rtts := make([]time.Duration, 0, n)
	b := []byte{'x'}
	for i := -min(benchWarmupRTs, n); i < n; i++ {
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		if i >= 0 {
			rtts = append(rtts, time.Since(t0))
		}
	}
	return rtts, nil
}

// benchConnect opens connections one after another for d (at most limit):
// connect, 1 byte each way, close. It returns how many completed and the
// time they took.
func benchConnect(ctx context.Context, p *benchPath, d time.Duration, limit int) (int, time.Duration, error) {
	start := time.Now()
	n := 0
	for n < limit && time.Since(start) < d {
		if err := benchConnectOnce(ctx, p); err != nil {
			return n, time.Since(start), fmt.Errorf("connection %d: %w", n+1, err)
		}
		n++
	}
	return n, time.Since(start), nil
}

func benchConnectOnce(ctx context.Context, p *benchPath) error {
	c, done, err := benchDial(ctx, p, modeConnect)
	if err != nil {
		return err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	// The answer, then the server's FIN: the server closes first.
	r := bufio.NewReaderSize(c, 16)
	if b, err := r.ReadByte(); err != nil || b != modeConnect {
		return fmt.Errorf("answer %q: %v", b, err)
	}
	if _, err := r.ReadByte(); err != io.EOF {
		return fmt.Errorf("want the server to close, got %v", err)
	}
	return nil
}
