// Package peerbench measures mantlet against direct traffic and against
// sidecar-style mutual TLS pairs (ghostunnel, nginx stream) on the testbed,
// in one run of interleaved rounds, so that every comparison is a ratio
// under the same noise; `mantlet bench` runs it (docs/performance.md).
//
// Two nodes: a client pod on node1, two server pods on node2, each pair
// once in a meshed namespace (mantlet's agents capture and tunnel it) and
// once in a plain one (direct, and the peers: a client-side proxy in the
// client pod's network namespace, a server-side proxy in each server pod's,
// TLS 1.3 with both sides presenting certificates of the mesh's CA). The
// load is made inside the client pod: iperf3 for throughput, the bench
// process for the rest; each server pod runs the bench's application
// server in a process of its own, the first of each path an iperf3
// server. The tunnel processes of each side (the node's agent; the peer's
// processes in the pods of that node) are measured from /proc.
package peerbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// Paths, besides the peers.
const (
	Direct  = "direct"
	Mantlet = "mantlet"
)

// The bench's cluster.
const (
	meshNS  = "bench"
	plainNS = "plain"
)

var repoRoot = kubebin.RepoRoot

func benchSpec() testbed.Spec {
	pod := func(name, ns, sa string) testbed.PodSpec {
		return testbed.PodSpec{Name: name, Namespace: ns, ServiceAccount: sa}
	}
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				pod("mesh-client", meshNS, "client"),
				pod("client", plainNS, "client"),
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				pod("mesh-server", meshNS, "server"),
				pod("mesh-server-b", meshNS, "server"),
				pod("server", plainNS, "server"),
				pod("server-b", plainNS, "server"),
			}},
		},
		Namespaces: map[string]map[string]string{meshNS: {meshtest.MeshAnnotation: "enabled"}},
	}
}

// Options configure Run. Durations and counts must be positive.
type Options struct {
	// Rounds is how many times every measurement runs, interleaved.
	Rounds int
	// Duration is how long each throughput measurement sends.
	Duration time.Duration
	// RoundTrips is the number of 1-byte echo round trips per latency
	// measurement.
	RoundTrips int
	// ConnDuration is how long each new-connections measurement runs, and
	// MaxConns the most connections it opens.
	ConnDuration time.Duration
	MaxConns     int
	// IdleConns is how many idle connections the memory measurement
	// holds, spread over the two server pods; Settle is how long after
	// they close it measures again.
	IdleConns int
	Settle    time.Duration
	// Peers are the peers to run (names from Peers).
	Peers []string
	// Ghostunnel is a ghostunnel program to run; default: the one built
	// from the repository's tools module (built if missing).
	Ghostunnel string
	// NoInstall keeps the bench from installing nginx or iperf3 with
	// apt-get.
	NoInstall bool
	// Profile, when positive, adds a profiling pass after the rounds: the
	// agents' Go CPU profiles during a 1-stream upload and an echo loop of
	// this length, and perf's counts of system calls and context switches
	// per echo round trip for every tunnel (when perf is installed).
	Profile time.Duration
	// Out is the results folder (created): bench.json, bench.png,
	// table.txt, and profiles.
	Out string
	// Stdout receives the table; Stderr progress, warnings and, when the
	// bench fails, the last lines of each agent's log (default: discard).
	Stdout, Stderr io.Writer
}

// path is one way from the client to the servers.
type path struct {
	name, about, version string
	dialer               *dialer
	sides                map[string]side // ClientSide, ServerSide; none for direct
	meshed               bool
	procs                []*proc
	// captured counts connections node1's ztunnel took from the client
	// during this path's measurements, attempted those the client opened.
	captured, attempted uint64
	// received counts the bytes the iperf3 servers received over the
	// throughput measurements; written, per side, the bytes the tunnel's
	// processes wrote meanwhile (at least received if the traffic went
	// through them).
	received uint64
	written  map[string]uint64
}

// bench is one run.
type bench struct {
	opts    Options
	binary  string // the mantlet executable
	iperf3  string // the iperf3 program
	work    string // the run's work folder (peers' files, iperf3's pid files)
	mesh    *meshtest.Mesh
	log     *slog.Logger
	paths   []*path
	skipped map[string]string
	mu      sync.Mutex // guards samples (the settle timers write too)
	samples samples
	prog    func(format string, args ...any)
	apps    []*proc
	// profiles lists the profile files written (guarded by mu).
	profiles []string
}

// ErrInterrupted is returned by Run when ctx was cancelled before it was
// done; everything it made is removed by then.
var ErrInterrupted = errors.New("interrupted; everything it made is removed")

// Run builds the testbed, starts a mesh whose agents run binary (a mantlet
// executable), the app servers and the peers, measures every path in
// opts.Rounds interleaved rounds, and prints and writes the results. It
// removes everything it made before it returns. It fails when a direct or
// peer connection was captured by the mesh or a meshed one was not.
func Run(ctx context.Context, binary string, opts Options) (res *Results, err error) {
	start := time.Now()
	stderr := orDiscard(opts.Stderr)
	b := &bench{
		opts:    opts,
		binary:  binary,
		log:     slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
		skipped: map[string]string{},
		samples: samples{},
		prog:    func(format string, args ...any) { fmt.Fprintf(stderr, "bench: "+format+"\n", args...) },
	}
	if err := os.MkdirAll(opts.Out, 0o755); err != nil {
		return nil, fmt.Errorf("peerbench: results folder: %w", err)
	}
	work, err := os.MkdirTemp("", "mantlet-peerbench-*")
	if err != nil {
		return nil, fmt.Errorf("peerbench: %w", err)
	}
	defer os.RemoveAll(work)
	b.work = work

	// iperf3 makes the throughput figures: without it there is no bench.
	b.iperf3, err = iperf3Binary(ctx, opts.NoInstall, b.log)
	if err != nil {
		return nil, interrupted(ctx, err)
	}
	// Find (or build, or install) the peers first: a failure there is a
	// skip, not an error.
	ghostunnel, ghostVersion, nginxVersion := "", "", ""
	for _, peer := range opts.Peers {
		switch peer {
		case Ghostunnel:
			b.prog("finding ghostunnel (building it the first time)")
			ghostunnel, ghostVersion, err = ghostunnelBinary(ctx, opts.Ghostunnel, b.log)
		case Nginx:
			nginxVersion, err = nginxInstalled(ctx)
			if err != nil && !opts.NoInstall {
				if ierr := installPackages(ctx, b.log, "nginx", "libnginx-mod-stream"); ierr != nil {
					err = errors.Join(err, ierr)
				} else {
					nginxVersion, err = nginxInstalled(ctx)
				}
			}
		default:
			err = fmt.Errorf("unknown peer (known: %s)", strings.Join(Peers, ", "))
		}
		if ctx.Err() != nil {
			return nil, ErrInterrupted
		}
		if err != nil {
			b.skip(peer, err)
		}
	}

	prefix := "pb" + randomToken(3)
	b.prog("starting a two-node mesh (testbed %s)", prefix)
	b.mesh, err = meshtest.Start(ctx, benchSpec(), meshtest.Options{
		Binary: binary,
		Prefix: prefix,
		// A log line per connection at debug would be part of what is
		// measured; the access log stays as shipped. 10,000 connections
		// from one pod: above the default share of the descriptors.
		AgentArgs: []string{"--log-level", "info", "--max-outbound-per-pod", "15000"},
		Logger:    slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return nil, interrupted(ctx, fmt.Errorf("peerbench: start the mesh: %w", err))
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			printAgentTails(stderr, b.mesh)
		}
		var errs []error
		for _, p := range b.paths {
			errs = append(errs, stopAll(p.procs))
		}
		errs = append(errs, stopAll(b.apps), b.mesh.Close())
		if cerr := errors.Join(errs...); cerr != nil {
			err = errors.Join(err, fmt.Errorf("peerbench: clean up: %w", cerr))
		}
		err = interrupted(ctx, err)
	}()
	if err := b.startApps(ctx); err != nil {
		return nil, err
	}
	if err := b.setUpPaths(ctx, work, ghostunnel, ghostVersion, nginxVersion); err != nil {
		return nil, err
	}
	if err := b.measure(ctx); err != nil {
		return nil, err
	}
	if opts.Profile > 0 {
		if err := b.profile(ctx); err != nil {
			return nil, err
		}
	}
	res = b.results(start)
	if err := b.check(); err != nil {
		return res, err
	}
	if err := res.write(opts.Out, orDiscard(opts.Stdout)); err != nil {
		return res, err
	}
	return res, nil
}

func (b *bench) skip(peer string, why error) {
	b.skipped[peer] = why.Error()
	b.prog("skipping %s: %v", peer, why)
}

// startApps starts the app server in every server pod, and an iperf3
// server in the first server pod of each path.
func (b *bench) startApps(ctx context.Context) error {
	for _, name := range []string{"mesh-server", "mesh-server-b", "server", "server-b"} {
		pod := b.mesh.Pod(name)
		addr := hostPort("0.0.0.0", AppPort)
		p, err := startProc(pod, "app server in "+name, b.binary, "bench", "--serve-app", addr)
		if err != nil {
			return err
		}
		b.apps = append(b.apps, p)
		if err := p.waitListening(ctx, pod, hostPort(pod.IP.String(), AppPort)); err != nil {
			return err
		}
		if name != "mesh-server" && name != "server" {
			continue
		}
		// The pid file names the run's folder on the command line, so a
		// leftover iperf3 server can be told from another run's.
		p, err = startProc(pod, "iperf3 server in "+name, b.iperf3, "--server", "--port", strconv.Itoa(IperfPort),
			"--pidfile", filepath.Join(b.work, "iperf3-"+name+".pid"))
		if err != nil {
			return err
		}
		b.apps = append(b.apps, p)
		if err := p.waitListening(ctx, pod, hostPort(pod.IP.String(), IperfPort)); err != nil {
			return err
		}
	}
	return nil
}

// iperf3Binary finds iperf3, installing it with apt-get if it is missing
// and install is allowed.
func iperf3Binary(ctx context.Context, noInstall bool, log *slog.Logger) (string, error) {
	path, err := exec.LookPath("iperf3")
	if err == nil || noInstall {
		if err != nil {
			err = fmt.Errorf("peerbench: iperf3 measures the throughput: %w (Debian: apt-get install iperf3)", err)
		}
		return path, err
	}
	if ierr := installPackages(ctx, log, "iperf3"); ierr != nil {
		return "", fmt.Errorf("peerbench: iperf3 measures the throughput: %w", errors.Join(err, ierr))
	}
	return exec.LookPath("iperf3")
}

// setUpPaths makes the paths: direct and mantlet, and the peers that
// could be found (the others are skipped, with the reason).
func (b *bench) setUpPaths(ctx context.Context, work, ghostunnel, ghostVersion, nginxVersion string) error {
	servers := func(names ...string) []netip.AddrPort {
		var out []netip.AddrPort
		for _, n := range names {
			out = append(out, netip.AddrPortFrom(b.mesh.Pod(n).IP, AppPort))
		}
		return out
	}
	iperf := func(name string) netip.AddrPort { return netip.AddrPortFrom(b.mesh.Pod(name).IP, IperfPort) }
	agent := func(node string) (side, error) {
		pid, err := b.mesh.AgentPID(node)
		return side{roots: []int{pid}}, err
	}
	c1, err := agent("node1")
	if err != nil {
		return err
	}
	s1, err := agent("node2")
	if err != nil {
		return err
	}
	b.paths = []*path{
		{name: Direct, about: "unmeshed pods, no tunnel", dialer: &dialer{client: b.mesh.Pod("client"), targets: servers("server", "server-b"), iperf: iperf("server"), iperf3: b.iperf3}},
		{name: Mantlet, about: "meshed pods: eBPF capture on node1, HBONE (HTTP/2 CONNECT over mutual TLS 1.3) between the nodes' agents", version: "this build",
			dialer: &dialer{client: b.mesh.Pod("mesh-client"), targets: servers("mesh-server", "mesh-server-b"), iperf: iperf("mesh-server"), iperf3: b.iperf3},
			sides:  map[string]side{ClientSide: c1, ServerSide: s1}, meshed: true},
	}
	env := &peerEnv{mesh: b.mesh, client: b.mesh.Pod("client"), servers: []*testbed.Pod{b.mesh.Pod("server"), b.mesh.Pod("server-b")}, log: b.log}
	for _, peer := range b.opts.Peers {
		if _, ok := b.skipped[peer]; ok {
			continue
		}
		env.dir = filepath.Join(work, peer)
		if err := os.MkdirAll(env.dir, 0o700); err != nil {
			return fmt.Errorf("peerbench: %w", err)
		}
		var (
			targets        []netip.AddrPort
			iperfTarget    netip.AddrPort
			client, server []*proc
			err            error
			p              = &path{name: peer}
		)
		switch peer {
		case Ghostunnel:
			b.prog("starting the ghostunnel pairs")
			targets, iperfTarget, client, server, err = env.startGhostunnel(ctx, ghostunnel)
			p.version, p.about = ghostVersion, "ghostunnel client in the client pod (one per server pod), ghostunnel server in each server pod; mutual TLS 1.3, chains and SPIFFE IDs checked both ways, and the server's DNS name"
		case Nginx:
			b.prog("starting the nginx pairs")
			targets, iperfTarget, client, server, err = env.startNginx(ctx)
			p.version, p.about = nginxVersion, "nginx stream in the client pod (a listener per server pod) and in each server pod; mutual TLS 1.3, chains checked both ways and the server's DNS name (nginx cannot match a SPIFFE ID)"
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			b.skip(peer, err)
			continue
		}
		p.dialer = &dialer{client: env.client, targets: targets, iperf: iperfTarget, iperf3: b.iperf3}
		p.procs = append(client, server...)
		p.sides = map[string]side{ClientSide: sideOf(client), ServerSide: sideOf(server)}
		b.paths = append(b.paths, p)
	}
	return nil
}

// sideOf returns the side made of the peer processes ps.
func sideOf(ps []*proc) side {
	var s side
	for _, p := range ps {
		if p.throughputOnly {
			s.throughputOnly = append(s.throughputOnly, p.pid())
		} else {
			s.roots = append(s.roots, p.pid())
		}
	}
	return s
}

// captured returns the connections node1's ztunnel took from its pods.
func (b *bench) captured() (uint64, error) {
	c, err := b.mesh.Counters("node1")
	return c.LookupOutbound, err
}

// record adds a sample.
func (b *bench) record(fig, side, path string, v float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.samples.add(fig, side, path, v)
}

// phase runs fn for each path in order and counts what node1's ztunnel
// captured meanwhile.
func (b *bench) phase(ctx context.Context, what string, order []*path, fn func(p *path) (attempted int, err error)) error {
	for _, p := range order {
		if err := ctx.Err(); err != nil {
			return err
		}
		for _, pr := range p.procs {
			if pr.exited() {
				return fmt.Errorf("peerbench: %s exited (%v); its output:\n%s", pr.name, pr.err, pr.out.String())
			}
		}
		b.prog("%s, %s", what, p.name)
		before, err := b.captured()
		if err != nil {
			return err
		}
		n, err := fn(p)
		if err != nil {
			var outs strings.Builder
			for _, pr := range p.procs {
				if o := pr.out.String(); o != "" {
					fmt.Fprintf(&outs, "\n--- last output of %s ---\n%s", pr.name, lastLines(o, logTail))
				}
			}
			return fmt.Errorf("peerbench: %s, %s: %w%s", what, p.name, err, outs.String())
		}
		after, err := b.captured()
		if err != nil {
			return err
		}
		p.captured += after - before
		p.attempted += uint64(n)
	}
	return nil
}

// usage is what a side's tunnel processes used while something ran.
type usage struct {
	cpu     time.Duration
	written uint64
}

// usageDuring measures the CPU and the bytes written of each side of p
// while fn runs.
func usageDuring(p *path, fn func() error) (map[string]usage, error) {
	read := func() (map[string]usage, error) {
		out := map[string]usage{}
		for name, s := range p.sides {
			d, err := s.cpu()
			if err != nil {
				return nil, err
			}
			w, err := s.written()
			if err != nil {
				return nil, err
			}
			out[name] = usage{cpu: d, written: w}
		}
		return out, nil
	}
	before, err := read()
	if err != nil {
		return nil, err
	}
	if err := fn(); err != nil {
		return nil, err
	}
	after, err := read()
	if err != nil {
		return nil, err
	}
	for name, a := range after {
		after[name] = usage{cpu: a.cpu - before[name].cpu, written: a.written - before[name].written}
	}
	return after, nil
}

// rssOf records the RSS of each side of p as fig.
func (b *bench) rssOf(p *path, fig string) error {
	for name, s := range p.sides {
		n, err := s.rss()
		if err != nil {
			return err
		}
		b.record(fig, name, p.name, float64(n))
	}
	return nil
}

// measure runs the rounds.
func (b *bench) measure(ctx context.Context) error {
	o := b.opts
	// Warm up: the first meshed connection fetches certificates and opens
	// the pooled HBONE connection; the peers load their keys.
	if err := b.phase(ctx, "warm-up", b.paths, func(p *path) (int, error) {
		for i := range p.dialer.targets {
			c, done, err := p.dialer.dial(ctx, i, modeConnect)
			if err != nil {
				return i, err
			}
			_ = c.SetDeadline(time.Now().Add(ioTimeout))
			_, err = io.ReadAll(c)
			done()
			if err != nil {
				return i + 1, err
			}
		}
		return len(p.dialer.targets), b.rssOf(p, "rss_start")
	}); err != nil {
		return err
	}
	for r := range o.Rounds {
		// Each round starts with another path, so that none is always
		// measured first (or right after the same one).
		order := slices.Clone(b.paths)
		k := r % len(order)
		order = append(order[k:], order[:k]...)
		b.prog("round %d of %d: %s", r+1, o.Rounds, names(order))
		for _, streams := range []int{1, 4} {
			tfig, cfig := "throughput_1_stream", "cpu_per_gb_1_stream"
			if streams == 4 {
				tfig, cfig = "throughput_4_streams", "cpu_per_gb_4_streams"
			}
			if err := b.phase(ctx, fmt.Sprintf("throughput, %d stream(s) for %v", streams, o.Duration), order, func(p *path) (int, error) {
				var n int64
				var took time.Duration
				use, err := usageDuring(p, func() (err error) {
					n, took, err = p.dialer.throughput(ctx, streams, o.Duration)
					return err
				})
				if err != nil {
					return streams + 1, err
				}
				p.received += uint64(n)
				for side, u := range use {
					if p.written == nil {
						p.written = map[string]uint64{}
					}
					p.written[side] += u.written
				}
				b.record(tfig, "", p.name, float64(n)*8/took.Seconds())
				for s, u := range use {
					b.record(cfig, s, p.name, u.cpu.Seconds()/(float64(n)/1e9))
				}
				return streams + 1, nil // iperf3's control connection, and the streams
			}); err != nil {
				return err
			}
		}
		if err := b.phase(ctx, fmt.Sprintf("%d echo round trips", o.RoundTrips), order, func(p *path) (int, error) {
			var p50, p99 time.Duration
			use, err := usageDuring(p, func() (err error) {
				p50, p99, err = p.dialer.echo(ctx, o.RoundTrips)
				return err
			})
			if err != nil {
				return 1, err
			}
			b.record("echo_p50", "", p.name, p50.Seconds())
			b.record("echo_p99", "", p.name, p99.Seconds())
			for s, u := range use {
				b.record("cpu_per_echo", s, p.name, u.cpu.Seconds()/float64(o.RoundTrips+min(warmupRTs, o.RoundTrips)))
			}
			return 1, nil
		}); err != nil {
			return err
		}
		if err := b.phase(ctx, fmt.Sprintf("new connections for %v, %d clients", o.ConnDuration, connWorkers), order, func(p *path) (int, error) {
			var n int
			var took time.Duration
			use, err := usageDuring(p, func() (err error) {
				n, took, err = p.dialer.connect(ctx, o.ConnDuration, o.MaxConns)
				return err
			})
			if err != nil {
				return n, err
			}
			b.record("conns_per_second", "", p.name, float64(n)/took.Seconds())
			for s, u := range use {
				b.record("cpu_per_conn", s, p.name, u.cpu.Seconds()/float64(n))
			}
			return n, nil
		}); err != nil {
			return err
		}
		if err := b.holdPhase(ctx, order); err != nil {
			return err
		}
	}
	return nil
}

// holdPhase holds o.IdleConns idle connections through each tunnel,
// measures memory before, during and o.Settle after, then waits for the
// last of the after measurements.
func (b *bench) holdPhase(ctx context.Context, order []*path) error {
	o := b.opts
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	defer wg.Wait()
	err := b.phase(ctx, fmt.Sprintf("%d idle connections", o.IdleConns), order, func(p *path) (int, error) {
		if len(p.sides) == 0 {
			return 0, nil // no tunnel to weigh
		}
		if err := b.rssOf(p, "rss_idle"); err != nil {
			return 0, err
		}
		conns, err := p.dialer.hold(ctx, o.IdleConns)
		if err != nil {
			return o.IdleConns, err
		}
		// Let the tunnels finish what the opening started.
		time.Sleep(time.Second)
		err = b.rssOf(p, "rss_held")
		closeAll(conns)
		if err != nil {
			return o.IdleConns, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-ctx.Done():
				return
			case <-time.After(o.Settle):
			}
			if err := b.rssOf(p, "rss_after"); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
		return o.IdleConns, nil
	})
	if err != nil {
		return err
	}
	b.prog("waiting %v after the last idle connections closed", o.Settle)
	wg.Wait()
	return errors.Join(errs...)
}

// check fails when a path was not what it claims to be: numbers of a path
// that was not (or not only) what it says would mislead.
func (b *bench) check() error {
	var errs []error
	for _, p := range b.paths {
		switch {
		case !p.meshed && p.captured != 0:
			errs = append(errs, fmt.Errorf("%d of the %s connections were captured by the mesh: the %s numbers are not what they claim", p.captured, p.name, p.name))
		case p.meshed && p.captured < p.attempted:
			errs = append(errs, fmt.Errorf("only %d of %d meshed connections were captured: the mantlet numbers are not all through the mesh", p.captured, p.attempted))
		}
		for _, side := range slices.Sorted(maps.Keys(p.sides)) {
			if w := p.written[side]; w < p.received {
				errs = append(errs, fmt.Errorf("the %s side of %s wrote %d bytes while the iperf3 server received %d: the throughput did not all go through it", side, p.name, w, p.received))
			}
		}
	}
	return errors.Join(errs...)
}

func names(ps []*path) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.name)
	}
	return strings.Join(s, ", ")
}

// MachineSummary describes the machine for the report.
func MachineSummary() string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	load, _ := os.ReadFile("/proc/loadavg")
	fields := strings.Fields(string(load))
	la := "?"
	if len(fields) >= 3 {
		la = strings.Join(fields[:3], " ")
	}
	return fmt.Sprintf("%d CPUs, Linux %s, %s, load average %s", runtime.NumCPU(), strings.TrimSpace(string(kernel)), runtime.Version(), la)
}

// interrupted returns ErrInterrupted instead of err, which is then only a
// consequence, when ctx was cancelled.
func interrupted(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return ErrInterrupted
	}
	return err
}
