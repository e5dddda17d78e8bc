package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

func init() {
	register(command{name: "demo", summary: "run a two-node mesh of network namespaces and show what it does (root)", run: runDemo})
}

const demoSynopsis = `[--keep] [--binary PATH]

Builds a two-node cluster out of network namespaces on this machine (nothing
is added to the machine's own network namespace), starts a mantlet agent on
each node with a demo CA, sends traffic between meshed pods and between
unmeshed pods, captures the wire between the nodes, and prints what it saw.
Everything is removed at the end, on failure and on Ctrl-C. It exits non-zero
if a check fails. Needs root (namespaces, eBPF).`

// scenarioBinary checks that the scenario command name (demo, bench) runs
// as root and returns the mantlet executable that runs its agents: binary,
// else this one.
func scenarioBinary(name, binary string) (string, error) {
	if geteuid() != 0 {
		return "", errNeedsRoot(name)
	}
	if binary != "" {
		return binary, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("find the mantlet executable: %w", err)
	}
	return exe, nil
}

// The demo's cluster: a meshed namespace and an unmeshed one, one client
// and one server of each on two nodes.
const (
	demoMeshNS     = "shop"
	demoPlainNS    = "legacy"
	demoPort       = 8080
	demoMessages   = 3
	demoIOTimeout  = 10 * time.Second
	demoFlowWait   = 5 * time.Second
	demoLogTail    = 25
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

type demoFlags struct {
	keep   bool
	binary string
}

func runDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "demo", demoSynopsis)
	f := demoFlags{}
	fs.BoolVar(&f.keep, "keep", false, "leave the mesh running after the report, with instructions to explore it; Ctrl-C removes it")
	fs.StringVar(&f.binary, "binary", "", "mantlet executable that runs the agents (default: this one)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet demo: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	bin, err := scenarioBinary("demo", f.binary)
	if err != nil {
		return err
	}
	f.binary = bin
	return demo(ctx, e, f)
}

// randomToken returns n random bytes in hex.
func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func demo(ctx context.Context, e *env, f demoFlags) (err error) {
	start := time.Now()
	w := e.stdout
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
		Binary: f.binary,
		Prefix: prefix,
		Dir:    dir,
		Stderr: agentLog,
		Logger: slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return demoInterrupted(ctx, fmt.Errorf("start the mesh: %w", err))
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			printAgentTails(e.stderr, m)
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

	// The echo servers live as long as the mesh, so that --keep leaves
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
		return demoInterrupted(ctx, err)
	}
	if res.metrics, err = demoMetrics(ctx, m); err != nil {
		return demoInterrupted(ctx, err)
	}
	checks := report.NewChecks(w)
	fmt.Fprintln(w, "\nCaptured connections (from the ztunnels' flow logs)")
	printFlows(w, res.flows)
	fmt.Fprintln(w, "\nChecks")
	checkDemo(checks, m, res)
	fmt.Fprintln(w, "\nMetrics (Prometheus, port 15020 in each node's network namespace)")
	printDemoMetrics(w, m, res)

	if err := checks.Err(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nAll checks passed in %s.\n", report.Duration(time.Since(start).Round(10*time.Millisecond)))
	if !f.keep {
		return nil
	}
	printKeepInstructions(w, m, dir)
	<-ctx.Done()
	fmt.Fprintln(w, "\nInterrupted.")
	return nil
}

// errInterrupted is returned when the user pressed Ctrl-C (or the command
// was told to stop) before it was done.
var errInterrupted = errors.New("interrupted; everything it made is removed")

// demoInterrupted returns errInterrupted instead of err, which is then only
// a consequence, when ctx was cancelled.
func demoInterrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errInterrupted
	}
	return err
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
	metrics                                  map[string][]promSample // per node, after the traffic
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
	// Flows are logged when they end; wait for both ends before the
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
		r.flows = append(r.flows, m.Flows(n.Name)...)
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

func printFlows(w io.Writer, flows []meshtest.Flow) {
	if len(flows) == 0 {
		fmt.Fprintln(w, "  (none)")
		return
	}
	for _, f := range flows {
		fmt.Fprintf(w, "  %s  %s %s  %s -> %s  sent %s, received %s", f.Node, f.Direction, f.Path, f.Src, f.Dst, report.Bytes(f.Sent), report.Bytes(f.Received))
		if f.Reason != "" && f.Reason != "-" {
			fmt.Fprintf(w, "  refused: %s", f.Reason)
		}
		fmt.Fprintln(w)
		fmt.Fprintf(w, "         %s -> %s\n", orNone(f.SrcID), orNone(f.DstID))
	}
}

func orNone(s string) string {
	if s == "" {
		return "(no identity)"
	}
	return s
}

// captured sums the counters that move when a connection is captured.
func captured(c bpf.Counters) uint64 {
	return c.Redirected + c.UplinkRedirected + c.LookupOutbound + c.LookupHBONE + c.LookupInboundPlain
}

func checkDemo(c *report.Checks, m *meshtest.Mesh, r *demoResult) {
	clientID, _ := m.ID(r.client.Name)
	serverID, _ := m.ID(r.server.Name)
	meshAddr := netip.AddrPortFrom(r.server.IP, demoPort)
	plainAddr := netip.AddrPortFrom(r.plainServer.IP, demoPort)

	// 1. The application sees nothing unusual.
	c.Check(len(r.meshPeers) == 1 && r.meshPeers[0].Addr() == r.client.IP,
		"the meshed server saw the client pod's own IP (peer %s), not a proxy's", peersString(r.meshPeers))

	// 2. The ztunnels carried the meshed connection, with both identities.
	var out, in *meshtest.Flow
	for i, f := range r.flows {
		if f.Dst != meshAddr || f.Src.Addr() != r.client.IP || f.Reason != "-" {
			continue
		}
		switch {
		case f.Node == r.client.Node && f.Direction == "outbound" && f.Path == "hbone":
			out = &r.flows[i]
		case f.Node == r.server.Node && f.Direction == "inbound" && f.Path == "hbone":
			in = &r.flows[i]
		}
	}
	c.Check(out != nil && in != nil, "the connection was captured on %s (outbound) and carried over HBONE to %s (inbound)%s",
		r.client.Node, r.server.Node, errSuffix(r.flowErr))
	c.Check(out != nil && in != nil && out.SrcID == clientID.String() && in.SrcID == clientID.String() &&
		out.DstID == serverID.String() && in.DstID == serverID.String(),
		"identities on both ends: client %s, server %s (the server learned the client's from its certificate)", clientID, serverID)
	c.Check(in != nil && in.Sent == r.meshExchanged && in.Received == r.meshExchanged,
		"every byte went through the tunnel: %s each way", report.Bytes(r.meshExchanged))
	c.Check(r.between[r.client.Node].LookupOutbound > r.before[r.client.Node].LookupOutbound &&
		r.between[r.server.Node].LookupHBONE > r.before[r.server.Node].LookupHBONE,
		"eBPF counters moved: %s handed %d connection(s) to the outbound listener, %s %d to the HBONE listener",
		r.client.Node, r.between[r.client.Node].LookupOutbound-r.before[r.client.Node].LookupOutbound,
		r.server.Node, r.between[r.server.Node].LookupHBONE-r.before[r.server.Node].LookupHBONE)

	src := istioOpened(r.metrics[r.client.Node], "source", clientID.String(), serverID.String())
	dst := istioOpened(r.metrics[r.server.Node], "destination", clientID.String(), serverID.String())
	c.Check(src != nil && dst != nil && src.labels["connection_security_policy"] == "mutual_tls" && dst.labels["connection_security_policy"] == "mutual_tls",
		"Istio's metrics count it on both ends: istio_tcp_connections_opened_total, reporter source on %s and destination on %s, connection_security_policy mutual_tls",
		r.client.Node, r.server.Node)

	// 3. The wire between the nodes.
	var meshPkts, plainPkts []testbed.Packet
	var meshBytes, allBytes int64
	stray := 0
	plainIPs := []netip.Addr{r.plainClient.IP, r.plainServer.IP}
	for _, p := range r.packets {
		allBytes += int64(len(p.Payload))
		if p.Proto != testbed.ProtoTCP {
			continue
		}
		if slices.Contains(plainIPs, p.Src.Addr()) || slices.Contains(plainIPs, p.Dst.Addr()) {
			plainPkts = append(plainPkts, p)
			continue
		}
		meshPkts = append(meshPkts, p)
		meshBytes += int64(len(p.Payload))
		if p.Src.Port() != meshtest.HBONEPort && p.Dst.Port() != meshtest.HBONEPort {
			stray++
		}
	}
	lost := ""
	if r.captureErr != nil {
		lost = " (" + r.captureErr.Error() + ")"
	}
	c.Check(r.captureErr == nil, "the capture on the underlay bridge is complete: %d packets, %s of payload, none lost%s",
		len(r.packets), report.Bytes(allBytes), lost)
	c.Check(len(meshPkts) > 0 && stray == 0,
		"meshed traffic on the wire: %d TCP packets (%s of payload), every one to or from port %d (%d on another port)",
		len(meshPkts), report.Bytes(meshBytes), meshtest.HBONEPort, stray)
	ok, text := tlsCheck(meshPkts, r.server.IP)
	c.Check(ok, "%s", text)
	c.Check(len(r.packets) > 0 && !testbed.Contains(r.packets, []byte(r.meshMarker)),
		"the meshed marker %q appears nowhere in clear (searched %d packets and their reassembled streams)", r.meshMarker, len(r.packets))

	// 4. Unmeshed traffic is left alone.
	plainSeen := testbed.Contains(plainPkts, []byte(r.plainMarker))
	direct := false
	for _, s := range testbed.Streams(plainPkts) {
		if s.Src.Addr() == r.plainClient.IP && s.Dst == plainAddr {
			direct = true
		}
	}
	c.Check(plainSeen && direct, "unmeshed traffic left alone: marker %q visible in plaintext, %s -> %s directly (as expected without the mesh)",
		r.plainMarker, r.plainClient.IP, plainAddr)
	plainFlows := 0
	for _, f := range r.flows {
		if f.Dst.Addr() == r.plainServer.IP || f.Src.Addr() == r.plainClient.IP {
			plainFlows++
		}
	}
	moved := uint64(0)
	for node := range r.after {
		moved += captured(r.after[node]) - captured(r.between[node])
	}
	plainSeries := 0
	for _, samples := range r.metrics {
		for _, s := range samples {
			if strings.HasPrefix(s.name, "istio_") && (s.labels["source_workload"] == r.plainClient.Name || s.labels["destination_workload"] == r.plainServer.Name) {
				plainSeries++
			}
		}
	}
	c.Check(plainFlows == 0 && moved == 0 && plainSeries == 0 && len(r.plainPeers) == 1 && r.plainPeers[0].Addr() == r.plainClient.IP,
		"no ztunnel saw it: %d flows in the logs, %d Istio metric series, capture counters moved by %d", plainFlows, plainSeries, moved)
}

// tlsCheck checks the HBONE connection's handshake as seen on the wire and
// returns the outcome and what it says.
func tlsCheck(pkts []testbed.Packet, server netip.Addr) (bool, string) {
	hbone := netip.AddrPortFrom(server, meshtest.HBONEPort)
	var ch, sh *testbed.TLSHello
	var from netip.AddrPort
	var errs []error
	for _, s := range testbed.Streams(pkts) {
		switch {
		case s.Dst == hbone && ch == nil:
			h, err := testbed.ParseTLSHello(s.Data)
			if err != nil {
				errs = append(errs, fmt.Errorf("client side: %w", err))
				continue
			}
			ch, from = h, s.Src
		case s.Src == hbone && sh == nil:
			h, err := testbed.ParseTLSHello(s.Data)
			if err != nil {
				errs = append(errs, fmt.Errorf("server side: %w", err))
				continue
			}
			sh = h
		}
	}
	ok := ch != nil && sh != nil && ch.Type == testbed.TLSClientHello && sh.Type == testbed.TLSServerHello &&
		ch.Version() == testbed.VersionTLS13 && sh.Version() == testbed.VersionTLS13 &&
		ch.ServerName == "" && slices.Contains(ch.ALPN, "h2") && !sh.PlaintextCertificate
	detail := ""
	switch {
	case ch == nil || sh == nil:
		detail = fmt.Sprintf(" (no complete handshake to %s found: %v)", hbone, errors.Join(errs...))
	case !ok:
		detail = fmt.Sprintf(" (client offered %#04x, SNI %q, ALPN %q; server chose %#04x, certificate in clear: %v)",
			ch.Version(), ch.ServerName, ch.ALPN, sh.Version(), sh.PlaintextCertificate)
	}
	return ok, fmt.Sprintf("it is TLS 1.3 from %s to the destination pod %s: client hello with ALPN h2 and no SNI, server hello chose TLS 1.3, certificates encrypted%s", from, hbone, detail)
}

func peersString(ps []netip.AddrPort) string {
	if len(ps) == 0 {
		return "no connection"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}

// promSample is one sample of the Prometheus text format.
type promSample struct {
	name   string
	labels map[string]string
	value  string
}

var (
	promLine     = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
	promUnescape = strings.NewReplacer(`\\`, `\`, `\"`, `"`, `\n`, "\n")
	promLabel    = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)
)

// parseProm reads the samples of a Prometheus text exposition; comments
// and lines it does not understand are skipped.
func parseProm(body string) []promSample {
	var out []promSample
	for _, line := range strings.Split(body, "\n") {
		m := promLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		s := promSample{name: m[1], labels: map[string]string{}, value: m[3]}
		for _, l := range promLabel.FindAllStringSubmatch(m[2], -1) {
			s.labels[l[1]] = promUnescape.Replace(l[2])
		}
		out = append(out, s)
	}
	return out
}

// format prints the sample with the labels named in keys, in that order.
func (s promSample) format(keys ...string) string {
	var ls []string
	for _, k := range keys {
		if v, ok := s.labels[k]; ok {
			ls = append(ls, fmt.Sprintf("%s=%q", k, v))
		}
	}
	if len(ls) == 0 {
		return s.name + " " + s.value
	}
	return s.name + "{" + strings.Join(ls, ",") + "} " + s.value
}

// demoMetrics fetches every node's metrics.
func demoMetrics(ctx context.Context, m *meshtest.Mesh) (map[string][]promSample, error) {
	out := map[string][]promSample{}
	for _, n := range m.TB.Nodes() {
		body, err := m.Metrics(ctx, n.Name)
		if err != nil {
			return nil, err
		}
		out[n.Name] = parseProm(body)
	}
	return out, nil
}

// istioOpened returns the istio_tcp_connections_opened_total sample of
// node for the meshed connection, as reporter saw it.
func istioOpened(samples []promSample, reporter, src, dst string) *promSample {
	for i, s := range samples {
		l := s.labels
		if s.name == "istio_tcp_connections_opened_total" && l["reporter"] == reporter &&
			l["source_principal"] == src && l["destination_principal"] == dst && s.value != "0" {
			return &samples[i]
		}
	}
	return nil
}

var demoShown = map[string][]string{
	"mantlet_datapath_packets_total":      {"event"},
	"mantlet_hbone_pool_handshakes_total": nil,
	"mantlet_agent_ready":                 nil,
}

func printDemoMetrics(w io.Writer, m *meshtest.Mesh, r *demoResult) {
	clientID, _ := m.ID(r.client.Name)
	serverID, _ := m.ID(r.server.Name)
	for _, n := range m.TB.Nodes() {
		fmt.Fprintf(w, "  %s:  nsenter --net=%s curl -s http://127.0.0.1:%d/metrics\n", n.Name, n.NS, meshtest.MetricsPort)
		reporter := "source"
		if n.Name == r.server.Node {
			reporter = "destination"
		}
		if s := istioOpened(r.metrics[n.Name], reporter, clientID.String(), serverID.String()); s != nil {
			fmt.Fprintf(w, "    %s  (other labels left out)\n", s.format("reporter", "source_principal", "destination_principal", "connection_security_policy"))
		}
		for _, s := range r.metrics[n.Name] {
			keys, ok := demoShown[s.name]
			if !ok || s.name == "mantlet_datapath_packets_total" && s.labels["event"] != "lookup_outbound" && s.labels["event"] != "lookup_hbone" {
				continue
			}
			fmt.Fprintf(w, "    %s\n", s.format(keys...))
		}
	}
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
  Metrics and readiness:       nsenter --net=%[5]s curl -s http://127.0.0.1:15020/metrics   (and :15021/healthz/ready)
  Watch the wire:              nsenter --net=/run/netns/%[7]s-underlay tcpdump -ni any   (if tcpdump is installed)
  The cluster file:            %[8]s

Press Ctrl-C here to remove everything. If this process is killed instead, the
agents die with it; remove the rest with:
  mantlet agent --cleanup --node-name node1 --pin-dir %[9]s
  mantlet agent --cleanup --node-name node2 --pin-dir %[10]s
  mantlet testbed down --prefix %[7]s
`, client.NS, server.IP, demoPort, plain.IP, n1.NS, filepath.Join(dir, "agents.log"), p, m.ConfigPath, m.PinDir("node1"), m.PinDir("node2"))
}

// printAgentTails prints the last lines of each agent's log, to explain a
// failure.
func printAgentTails(w io.Writer, m *meshtest.Mesh) {
	for _, n := range m.TB.Nodes() {
		lines := strings.Split(strings.TrimRight(m.AllLogs(n.Name), "\n"), "\n")
		if len(lines) > demoLogTail {
			lines = lines[len(lines)-demoLogTail:]
		}
		fmt.Fprintf(w, "--- last lines of the agent log of %s ---\n%s\n", n.Name, strings.Join(lines, "\n"))
	}
}
