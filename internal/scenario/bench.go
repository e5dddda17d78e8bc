package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

// The bench's cluster.
const (
	benchMeshNS  = "bench"
	benchPlainNS = "direct"
)

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

// BenchOptions configure Bench. The durations and counts must be
// positive.
type BenchOptions struct {
	// Duration is how long each throughput measurement sends.
	Duration time.Duration
	// RoundTrips is the number of 1-byte echo round trips per latency
	// measurement.
	RoundTrips int
	// ConnDuration is how long each new-connections measurement runs, and
	// MaxConns the most connections it opens.
	ConnDuration time.Duration
	MaxConns     int
	// Stdout receives the report (default: discard).
	Stdout io.Writer
	// Stderr receives progress, the mesh's warnings and, when the bench
	// fails, the last lines of each agent's log (default: discard).
	Stderr io.Writer
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

// Bench builds a two-node mesh whose agents run binary (a mantlet
// executable) and measures, in the same run, traffic from a pod of node1
// to a pod of node2 in two ways: direct (the pods' namespace is not
// meshed) and through mantlet; then it prints a table (docs/demo.md). It
// removes everything before it returns. It fails, after the table, when a
// direct connection was captured or a meshed one was not, and returns
// ErrInterrupted when ctx was cancelled before it was done.
func Bench(ctx context.Context, binary string, opts BenchOptions) (err error) {
	w, stderr := orDiscard(opts.Stdout), orDiscard(opts.Stderr)
	progress := func(format string, args ...any) { fmt.Fprintf(stderr, "bench: "+format+"\n", args...) }
	prefix := "bench" + randomToken(3)
	progress("starting a two-node mesh (testbed %s)", prefix)
	m, err := meshtest.Start(ctx, benchSpec(), meshtest.Options{
		Binary: binary,
		Prefix: prefix,
		// A log line per connection would be part of what is measured.
		AgentArgs: []string{"--log-level", "info"},
		Logger:    slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return interrupted(ctx, fmt.Errorf("start the mesh: %w", err))
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			printAgentTails(stderr, m)
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
				return interrupted(ctx, fmt.Errorf("%s, %s: %w", what, p.name, err))
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
	if err := phase(fmt.Sprintf("throughput for %v", opts.Duration), func(p *benchPath, r *benchResult) error {
		cpu0, err := processesCPU(pids)
		if err != nil {
			return err
		}
		r.attempted++
		if r.bytes, r.elapsed, err = benchThroughput(ctx, p, opts.Duration); err != nil {
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
	if err := phase(fmt.Sprintf("%d echo round trips", opts.RoundTrips), func(p *benchPath, r *benchResult) error {
		r.attempted++
		rtts, err := benchEcho(ctx, p, opts.RoundTrips)
		if err != nil {
			return err
		}
		r.p50, r.p99 = report.Percentile(rtts, 50), report.Percentile(rtts, 99)
		return nil
	}); err != nil {
		return err
	}
	if err := phase(fmt.Sprintf("new connections for %v", opts.ConnDuration), func(p *benchPath, r *benchResult) error {
		var err error
		r.conns, r.connTime, err = benchConnect(ctx, p, opts.ConnDuration, opts.MaxConns)
		r.attempted += r.conns
		return err
	}); err != nil {
		return err
	}
	return printBench(w, opts, results["direct"], results["mantlet"])
}

// printBench prints the table of the direct (d) and meshed (x) results
// and fails when either path was not what it claims to be.
func printBench(w io.Writer, opts BenchOptions, d, x *benchResult) error {
	fmt.Fprintf(w, "mantlet bench: pod to pod across two nodes of a testbed, direct (unmeshed namespace) vs through mantlet (meshed: eBPF capture, HBONE, mutual TLS 1.3)\n")
	fmt.Fprintf(w, "machine: %s\n\n", machineSummary())
	t := report.NewTable("", "direct", "mantlet", "mantlet/direct")
	t.Add(fmt.Sprintf("throughput, 1 stream, %v", opts.Duration), report.Rate(d.throughput), report.Rate(x.throughput), report.Ratio(x.throughput, d.throughput))
	t.Add(fmt.Sprintf("echo latency p50, %d round trips", opts.RoundTrips), report.Duration(d.p50), report.Duration(x.p50), report.Ratio(float64(x.p50), float64(d.p50)))
	t.Add("echo latency p99", report.Duration(d.p99), report.Duration(x.p99), report.Ratio(float64(x.p99), float64(d.p99)))
	t.Add(fmt.Sprintf("new connections per second, %v", opts.ConnDuration), report.Number(d.connsPerSecond()), report.Number(x.connsPerSecond()), report.Ratio(x.connsPerSecond(), d.connsPerSecond()))
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
