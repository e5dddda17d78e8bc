package scenario

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

// The demo's cluster: a meshed namespace and an unmeshed one, one client
// and one server of each on two nodes.
const (
	demoMeshNS     = "shop"
	demoPlainNS    = "legacy"
	demoPort       = 8080
	demoMessages   = 3
	demoIOTimeout  = 10 * time.Second
	demoFlowWait   = 5 * time.Second
	demoPrefixStem = "demo"
)

func demoSpec() testbed.Spec {
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "client", Namespace: demoMeshNS, ServiceAccount: "client"},
				{Name: "legacy-client", Namespace: demoPlainNS},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: demoMeshNS, ServiceAccount: "server"},
				{Name: "legacy-server", Namespace: demoPlainNS},
			}},
		},
		Namespaces: map[string]map[string]string{demoMeshNS: {meshtest.MeshAnnotation: "enabled"}},
	}
}

// DemoOptions configure Demo.
type DemoOptions struct {
	// Keep leaves the mesh and the echo servers running after the report,
	// with instructions to explore them, until ctx is done.
	Keep bool
	// Stdout receives the report (default: discard).
	Stdout io.Writer
	// Stderr receives the mesh's warnings and, when the demo fails, the
	// last lines of each agent's log (default: discard).
	Stderr io.Writer
}

// Demo builds a two-node mesh whose agents run binary (a mantlet
// executable), sends traffic between meshed pods and between unmeshed
// pods while it captures the wire between the nodes, and prints what it
// saw and the checks it made (docs/demo.md). It removes everything before
// it returns. It returns an error when a check failed, and ErrInterrupted
// when ctx was cancelled before the report was done.
func Demo(ctx context.Context, binary string, opts DemoOptions) (err error) {
	start := time.Now()
	w, stderr := orDiscard(opts.Stdout), orDiscard(opts.Stderr)
	dir, err := os.MkdirTemp("", "mantlet-demo-*")
	if err != nil {
		return fmt.Errorf("temporary directory: %w", err)
	}
	defer os.RemoveAll(dir)
	agentLog, err := os.Create(filepath.Join(dir, "agents.log"))
	if err != nil {
		return fmt.Errorf("agent log: %w", err)
	}
	defer agentLog.Close()

	prefix := demoPrefixStem + randomToken(3)
	fmt.Fprintf(w, "mantlet demo: a two-node mesh of network namespaces (testbed %s), real eBPF capture, real mutual TLS\n\n", prefix)
	m, err := meshtest.Start(ctx, demoSpec(), meshtest.Options{
		Binary: binary,
		Prefix: prefix,
		Dir:    dir,
		Stderr: agentLog,
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return interrupted(ctx, fmt.Errorf("start the mesh: %w", err))
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			printAgentTails(stderr, m)
		}
		fmt.Fprintf(w, "\nRemoving the mesh (agents, pinned programs, namespaces)...\n")
		if cerr := m.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		} else {
			fmt.Fprintln(w, "Removed.")
		}
	}()

	fmt.Fprintln(w, "Cluster")
	printDemoCluster(w, m)
	fmt.Fprintf(w, "  both agents ready (demo CA, trust domain %s), pods of %q enrolled\n\n", m.TrustDomain().Name(), demoMeshNS)

	// The echo servers live as long as the mesh, so that Keep leaves
	// something to talk to.
	meshEcho, err := meshtest.StartEcho(ctx, m.Pod("server"), demoPort)
	if err != nil {
		return err
	}
	defer meshEcho.Close()
	plainEcho, err := meshtest.StartEcho(ctx, m.Pod("legacy-server"), demoPort)
	if err != nil {
		return err
	}
	defer plainEcho.Close()

	res, err := driveDemo(ctx, w, m, meshEcho, plainEcho)
	if err != nil {
		return interrupted(ctx, err)
	}
	if res.metrics, err = demoMetrics(ctx, m); err != nil {
		return interrupted(ctx, err)
	}
	checks := report.NewChecks(w)
	fmt.Fprintln(w, "\nCaptured connections (the flows each agent recorded, from its admin API)")
	printFlows(w, res.flows)
	fmt.Fprintln(w, "\nChecks")
	checkDemo(checks, m, res)
	fmt.Fprintln(w, "\nMetrics (Prometheus, port 15020 in each node's network namespace)")
	printDemoMetrics(w, m, res)

	if err := checks.Err(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nAll checks passed in %s.\n", report.Duration(time.Since(start).Round(10*time.Millisecond)))
	if !opts.Keep {
		return nil
	}
	printKeepInstructions(w, m, dir)
	<-ctx.Done()
	fmt.Fprintln(w, "\nInterrupted.")
	return nil
}

func printDemoCluster(w io.Writer, m *meshtest.Mesh) {
	t := report.NewTable("node", "node IP", "pod", "pod IP", "").LeftAligned()
	for _, n := range m.TB.Nodes() {
		for _, p := range n.Pods {
			meshed := "not meshed"
			if p.Namespace == demoMeshNS {
				meshed = "meshed (service account " + p.ServiceAccount + ")"
			}
			t.Add(n.Name, n.IP.String(), p.Namespace+"/"+p.Name, p.IP.String(), meshed)
		}
	}
	_ = t.Write(w, "  ")
	fmt.Fprintf(w, "  network namespaces: /run/netns/%[1]s-node-<node>, /run/netns/%[1]s-pod-<pod>, the wire: /run/netns/%[1]s-underlay\n", m.TB.Prefix())
}

// demoResult is what the traffic phase observed.
type demoResult struct {
	client, server, plainClient, plainServer *testbed.Pod
	meshMarker, plainMarker                  string
	meshPeers, plainPeers                    []netip.AddrPort
	meshExchanged, plainExchanged            int64
	flows                                    []meshtest.Flow
	before, between, after                   map[string]bpf.Counters // per node
	packets                                  []testbed.Packet
	captureErr                               error
	flowErr                                  error
	metrics                                  map[string]meshtest.Metrics // per node, after the traffic
}

func driveDemo(ctx context.Context, w io.Writer, m *meshtest.Mesh, meshEcho, plainEcho *meshtest.Echo) (*demoResult, error) {
	r := &demoResult{
		client: m.Pod("client"), server: m.Pod("server"),
		plainClient: m.Pod("legacy-client"), plainServer: m.Pod("legacy-server"),
		meshMarker:  "mantlet-demo-secret-" + randomToken(4),
		plainMarker: "legacy-demo-plaintext-" + randomToken(4),
	}
	capture, err := m.TB.Capture(ctx)
	if err != nil {
		return nil, err
	}
	stopped := false
	defer func() {
		if !stopped {
			_, _ = capture.Stop()
		}
	}()
	if r.before, err = demoCounters(m); err != nil {
		return nil, err
	}

	fmt.Fprintln(w, "Traffic (echo servers on port 8080, clients send lines that carry a marker)")
	if r.meshExchanged, err = demoExchange(ctx, r.client, meshEcho.Addr, r.meshMarker); err != nil {
		return nil, fmt.Errorf("meshed traffic %s -> %s: %w", r.client.Name, r.server.Name, err)
	}
	fmt.Fprintf(w, "  %s/%s -> %s/%s %s: %d lines, %s each way, echoed intact (marker %q)\n",
		r.client.Namespace, r.client.Name, r.server.Namespace, r.server.Name, meshEcho.Addr, demoMessages, report.Bytes(r.meshExchanged), r.meshMarker)
	// Flows are recorded when they end; wait for both ends before the
	// unmeshed phase so that the counters in between belong to one phase.
	fctx, cancel := context.WithTimeout(ctx, demoFlowWait)
	isMeshed := func(fl meshtest.Flow) bool { return fl.Dst == meshEcho.Addr && fl.Src.Addr() == r.client.IP }
	_, err1 := m.WaitFlow(fctx, r.client.Node, isMeshed)
	_, err2 := m.WaitFlow(fctx, r.server.Node, isMeshed)
	cancel()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	r.flowErr = errors.Join(err1, err2)
	if r.between, err = demoCounters(m); err != nil {
		return nil, err
	}

	if r.plainExchanged, err = demoExchange(ctx, r.plainClient, plainEcho.Addr, r.plainMarker); err != nil {
		return nil, fmt.Errorf("unmeshed traffic %s -> %s: %w", r.plainClient.Name, r.plainServer.Name, err)
	}
	fmt.Fprintf(w, "  %s/%s -> %s/%s %s: %d lines, %s each way, echoed intact (marker %q)\n",
		r.plainClient.Namespace, r.plainClient.Name, r.plainServer.Namespace, r.plainServer.Name, plainEcho.Addr, demoMessages, report.Bytes(r.plainExchanged), r.plainMarker)

	stopped = true
	r.packets, r.captureErr = capture.Stop()
	if r.after, err = demoCounters(m); err != nil {
		return nil, err
	}
	r.meshPeers, r.plainPeers = meshEcho.Peers(), plainEcho.Peers()
	for _, n := range m.TB.Nodes() {
		flows, err := m.Flows(ctx, n.Name)
		if err != nil {
			return nil, err
		}
		r.flows = append(r.flows, flows...)
	}
	return r, ctx.Err()
}

func demoCounters(m *meshtest.Mesh) (map[string]bpf.Counters, error) {
	out := map[string]bpf.Counters{}
	for _, n := range m.TB.Nodes() {
		c, err := m.Counters(n.Name)
		if err != nil {
			return nil, err
		}
		out[n.Name] = c
	}
	return out, nil
}

// demoExchange sends demoMessages lines carrying marker from pod to addr,
// reads each echo back, half-closes and waits for the server's end. It
// returns the bytes sent (and received).
func demoExchange(ctx context.Context, pod *testbed.Pod, addr netip.AddrPort, marker string) (int64, error) {
	c, err := pod.Dial(ctx, "tcp4", addr.String())
	if err != nil {
		return 0, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(demoIOTimeout))
	rd := bufio.NewReader(c)
	var n int64
	for i := 1; i <= demoMessages; i++ {
		line := fmt.Sprintf("order %d from %s/%s: %s\n", i, pod.Namespace, pod.Name, marker)
		if _, err := io.WriteString(c, line); err != nil {
			return n, err
		}
		got, err := rd.ReadString('\n')
		if err != nil {
			return n, fmt.Errorf("read echo %d: %w", i, err)
		}
		if got != line {
			return n, fmt.Errorf("echo %d came back as %q, want %q", i, got, line)
		}
		n += int64(len(line))
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return n, err
		}
	}
	if rest, err := io.ReadAll(rd); err != nil || len(rest) > 0 {
		return n, fmt.Errorf("after half-close: %d stray bytes, %v", len(rest), err)
	}
	return n, nil
}

func printKeepInstructions(w io.Writer, m *meshtest.Mesh, dir string) {
	p := m.TB.Prefix()
	client, server, plain := m.Pod("client"), m.Pod("server"), m.Pod("legacy-server")
	n1 := m.Node("node1")
	fmt.Fprintf(w, `
The mesh keeps running (--keep). In another terminal, as root:

  Talk from a meshed pod (bash's /dev/tcp; the echo servers stay up):
    nsenter --net=%[1]s bash -c 'exec 3<>/dev/tcp/%[2]s/%[3]d; echo hello >&3; head -1 <&3'
  The same to the unmeshed server (plaintext, not captured):
    nsenter --net=%[1]s bash -c 'exec 3<>/dev/tcp/%[4]s/%[3]d; echo hello >&3; head -1 <&3'
  Enter a pod or a node:       nsenter --net=%[1]s bash     nsenter --net=%[5]s bash
  Agent logs (JSON, debug):    tail -f %[6]s
  Ask an agent (admin API):    mantlet flows --node %[11]s --follow   (and status, workloads, certs)
  Metrics and readiness:       nsenter --net=%[5]s curl -s http://127.0.0.1:15020/metrics   (and :15021/healthz/ready)
  Watch the wire:              nsenter --net=/run/netns/%[7]s-underlay tcpdump -ni any   (if tcpdump is installed)
  The cluster file:            %[8]s

Press Ctrl-C here to remove everything. If this process is killed instead, the
agents die with it; remove the rest with:
  mantlet agent --cleanup --node-name node1 --pin-dir %[9]s
  mantlet agent --cleanup --node-name node2 --pin-dir %[10]s
  mantlet testbed down --prefix %[7]s
`, client.NS, server.IP, demoPort, plain.IP, n1.NS, filepath.Join(dir, "agents.log"), p, m.ConfigPath, m.PinDir("node1"), m.PinDir("node2"),
		filepath.Base(m.PinDir("node1")))
}
