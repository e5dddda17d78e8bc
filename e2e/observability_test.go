//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// observeSpec is shopSpec with labels and a service in front of the
// server.
func observeSpec() testbed.Spec {
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "client", Namespace: "shop", ServiceAccount: "client", Labels: map[string]string{"app": "client"}},
				{Name: "neighbour", Namespace: "shop", ServiceAccount: "neighbour"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server", Labels: map[string]string{"app": "server"}},
			}},
		},
		Services:   []testbed.ServiceSpec{{Name: "server", Namespace: "shop", Selector: map[string]string{"app": "server"}, Ports: []testbed.ServicePort{{Port: 80, TargetPort: appPort}}}},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
}

// scrape returns node's metric families, parsed.
func scrape(t *testing.T, m *meshtest.Mesh, node string) meshtest.Metrics {
	t.Helper()
	mfs, err := m.Metrics(context.Background(), node)
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// traffic are the labels of one series of the istio_tcp_* families.
func traffic(reporter, src, srcNS, srcID, dst, dstNS, dstID, svc, security, flag string) map[string]string {
	return map[string]string{
		"reporter": reporter, "source_workload": src, "source_workload_namespace": srcNS, "source_principal": srcID,
		"destination_workload": dst, "destination_workload_namespace": dstNS, "destination_principal": dstID,
		"destination_service": svc, "connection_security_policy": security, "response_flags": flag,
	}
}

// waitSeries scrapes node until the series has want (within tolerance),
// and fails with the family's series when it does not within 10 s.
func waitSeries(t *testing.T, m *meshtest.Mesh, node, name string, labels map[string]string, want, tolerance float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs := scrape(t, m, node)
		got, ok := mfs.Value(name, labels)
		if ok && got >= want-tolerance && got <= want+tolerance {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s%v = %v (exists: %v), want %v ± %v; the family has:\n%s", node, name, labels, got, ok, want, tolerance, mfs.Describe(name))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// accessLog returns the access log lines of node's agent (its stdout,
// JSON lines of kind "flow").
func accessLog(m *meshtest.Mesh, node string) []events.Flow {
	var out []events.Flow
	for _, line := range strings.Split(m.Logs(node), "\n") {
		var ev events.Flow
		if strings.HasPrefix(line, `{"v":1,`) && json.Unmarshal([]byte(line), &ev) == nil && ev.Kind == events.KindFlow {
			out = append(out, ev)
		}
	}
	return out
}

// mantlet runs the mantlet command inside node's namespace (so the
// default admin address, 127.0.0.1:15000, is that node's agent) and
// returns its stdout.
func mantlet(t *testing.T, m *meshtest.Mesh, node string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := m.Node(node).Command(ctx, binary, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("mantlet %s on %s: %v\n%s%s", strings.Join(args, " "), node, err, out.String(), errb.String())
	}
	return out.String()
}

// TestMetricsAccessLogAndFlowsShowTheTraffic sends known traffic between
// meshed pods (through a service to the other node, straight to the
// other node's pod, and to a pod of the same node) and checks what an
// operator sees: the exact istio_tcp_* series on both nodes, bytes counted
// while a connection is still open, mantlet's own metrics, one access log
// line per connection, and the same flows through 'mantlet flows' and the
// admin socket.
func TestMetricsAccessLogAndFlowsShowTheTraffic(t *testing.T) {
	m := startMesh(t, observeSpec(), meshtest.Options{AgentArgs: []string{"--metrics-flush", "200ms"}})
	server := echo(t, m, "server", appPort)
	neighbour := echo(t, m, "neighbour", appPort)
	vip := netip.AddrPortFrom(m.TB.Services()[0].IP, 80)
	id := func(pod string) string {
		i, err := m.ID(pod)
		if err != nil {
			t.Fatal(err)
		}
		return i.String()
	}
	const svc = "server.shop.svc.cluster.local"
	viaService := traffic("source", "client", "shop", id("client"), "server", "shop", id("server"), svc, "mutual_tls", "-")
	direct := traffic("source", "client", "shop", id("client"), "server", "shop", id("server"), "unknown", "mutual_tls", "-")
	atServer := traffic("destination", "client", "shop", id("client"), "server", "shop", id("server"), "unknown", "mutual_tls", "-")
	localSrc := traffic("source", "client", "shop", id("client"), "neighbour", "shop", id("neighbour"), "unknown", "mutual_tls", "-")
	localDst := traffic("destination", "client", "shop", id("client"), "neighbour", "shop", id("neighbour"), "unknown", "mutual_tls", "-")

	// A long connection through the service: its bytes show while it is
	// open (flushed every 200 ms), on both nodes.
	const mib = 1 << 20
	long := dial(t, m, "client", vip)
	// Connections end in their own time (the long one's end can reach
	// node1's ztunnel after a later connection's), so log lines and flows
	// are found by the client's address, never by position.
	dsts := map[string]string{long.LocalAddr().String(): "server"} // client address -> destination pod
	ping(t, long, string(randomBytes(t, mib)))
	waitSeries(t, m, "node1", "istio_tcp_connections_opened_total", viaService, 1, 0)
	waitSeries(t, m, "node1", "istio_tcp_received_bytes_total", viaService, mib, 0)
	waitSeries(t, m, "node1", "istio_tcp_sent_bytes_total", viaService, mib, 0)
	waitSeries(t, m, "node2", "istio_tcp_received_bytes_total", atServer, mib, 0)
	if _, ok := scrape(t, m, "node1").Value("istio_tcp_connections_closed_total", viaService); ok {
		t.Error("node1 counts the open connection as closed")
	}
	roundTrip(t, long, []byte("bye")) // half-close, echo, close
	long.Close()

	// Three short connections straight to the server's pod, two to the
	// neighbour on the same node.
	for range 3 {
		c := dial(t, m, "client", server.Addr)
		dsts[c.LocalAddr().String()] = "server"
		roundTrip(t, c, randomBytes(t, 1000))
	}
	for range 2 {
		c := dial(t, m, "client", neighbour.Addr)
		dsts[c.LocalAddr().String()] = "neighbour"
		roundTrip(t, c, randomBytes(t, 500))
	}

	for _, c := range []struct {
		node, name string
		labels     map[string]string
		want       float64
	}{
		{"node1", "istio_tcp_connections_opened_total", viaService, 1},
		{"node1", "istio_tcp_connections_closed_total", viaService, 1},
		{"node1", "istio_tcp_received_bytes_total", viaService, mib + 3},
		{"node1", "istio_tcp_sent_bytes_total", viaService, mib + 3},
		{"node1", "istio_tcp_connections_opened_total", direct, 3},
		{"node1", "istio_tcp_connections_closed_total", direct, 3},
		{"node1", "istio_tcp_received_bytes_total", direct, 3000},
		{"node1", "istio_tcp_sent_bytes_total", direct, 3000},
		// The same-node path is reported by both ends.
		{"node1", "istio_tcp_connections_closed_total", localSrc, 2},
		{"node1", "istio_tcp_connections_closed_total", localDst, 2},
		{"node1", "istio_tcp_received_bytes_total", localDst, 1000},
		{"node1", "istio_tcp_sent_bytes_total", localSrc, 1000},
		// The destination's node sees all four HBONE connections; it does
		// not know which went through the service.
		{"node2", "istio_tcp_connections_opened_total", atServer, 4},
		{"node2", "istio_tcp_connections_closed_total", atServer, 4},
		{"node2", "istio_tcp_received_bytes_total", atServer, mib + 3 + 3000},
		{"node2", "istio_tcp_sent_bytes_total", atServer, mib + 3 + 3000},
		{"node1", "mantlet_hbone_streams_total", map[string]string{}, 4},
	} {
		waitSeries(t, m, c.node, c.name, c.labels, c.want, 0)
	}
	mfs := scrape(t, m, "node1")
	if _, ok := mfs["istio_tcp_connections_failed_total"]; ok {
		t.Errorf("node1 counts failed connections:\n%s", mfs.Describe("istio_tcp_connections_failed_total"))
	}
	// The agents agreed on the post-quantum hybrid for every tunnel, and
	// say so on both sides.
	hs, _ := mfs.Value("mantlet_hbone_pool_handshakes_total", map[string]string{})
	if v, _ := mfs.Value("mantlet_hbone_key_exchanges_total", map[string]string{"side": "client", "key_exchange": "X25519MLKEM768"}); hs < 1 || v != hs {
		t.Errorf("node1 made %v HBONE handshakes, %v of them with X25519MLKEM768; want all, at least one:\n%s", hs, v, mfs.Describe("mantlet_hbone_key_exchanges_total"))
	}
	mfs2 := scrape(t, m, "node2")
	if v, _ := mfs2.Value("mantlet_hbone_key_exchanges_total", map[string]string{"side": "server", "key_exchange": "X25519MLKEM768"}); v < 1 || len(mfs2.Series("mantlet_hbone_key_exchanges_total", nil)) != 1 {
		t.Errorf("node2 accepted %v HBONE connections with X25519MLKEM768, want at least one and no other group:\n%s", v, mfs2.Describe("mantlet_hbone_key_exchanges_total"))
	}
	if v, ok := mfs.Value("mantlet_svid_expiry_seconds", map[string]string{"identity": id("client")}); !ok || v < 23*3600 || v > 24*3600 {
		t.Errorf("mantlet_svid_expiry_seconds of the client = %v (%v), want just under 24h", v, ok)
	}
	if v, _ := mfs.Value("mantlet_svid_issuances_total", map[string]string{"result": "ok"}); v < 2 {
		t.Errorf("node1 counted %v SVID issuances, want at least 2 (client, neighbour)", v)
	}
	// Each connection is decided once: by the destination's node.
	if v, ok := mfs.Value("mantlet_policy_decisions_total", map[string]string{"action": "allow", "reason": "allowed-by-default", "policy": ""}); !ok || v != 2 {
		t.Errorf("node1 counted %v allow decisions, want 2 (the same-node connections)", v)
	}
	waitSeries(t, m, "node2", "mantlet_policy_decisions_total", map[string]string{"action": "allow", "reason": "allowed-by-default", "policy": ""}, 4, 0)

	// One access log line per connection, when it closes.
	closes := map[string]events.Flow{} // by client address
	for _, ev := range accessLog(m, "node1") {
		if ev.Event != events.Close || ev.Direction != "outbound" {
			continue
		}
		src := ev.Src.Addr.String()
		if _, dup := closes[src]; dup || ev.Dst.Workload != dsts[src] {
			t.Errorf("node1's access log: close line %+v; want one per connection, to %q", ev, dsts[src])
		}
		closes[src] = ev
	}
	if len(closes) != len(dsts) {
		t.Fatalf("node1's access log has close lines from %d connections, want %d: %+v", len(closes), len(dsts), closes)
	}
	viaSvc := closes[long.LocalAddr().String()]
	if viaSvc.Src.Identity != id("client") || viaSvc.Dst.Identity != id("server") || viaSvc.Dst.Service != svc || viaSvc.Path != "hbone" ||
		viaSvc.Dst.Addr != server.Addr || viaSvc.BytesSent != mib+3 || viaSvc.BytesReceived != mib+3 ||
		viaSvc.ResponseFlag != "-" || viaSvc.Verdict != events.Allowed || viaSvc.DurationMS <= 0 {
		t.Errorf("access log line of the service connection: %+v", viaSvc)
	}
	if n := len(accessLog(m, "node2")); n != 4 {
		t.Errorf("node2's access log has %d lines, want 4 (its inbound connections)", n)
	}

	// The same flows through the CLI inside the node, and through the
	// admin socket from outside.
	var evs []events.Flow
	if err := json.Unmarshal([]byte(mantlet(t, m, "node1", "flows", "-o", "json", "--last", "0")), &evs); err != nil {
		t.Fatal(err)
	}
	flows := map[uint64]events.Flow{}
	for _, ev := range evs {
		flows[ev.ID] = ev
	}
	for _, cl := range closes {
		if ev, ok := flows[cl.ID]; !ok || ev.Src.Addr != cl.Src.Addr || ev.Dst.Workload != cl.Dst.Workload || ev.BytesSent != cl.BytesSent {
			t.Errorf("mantlet flows on node1 shows flow %d (from %s) as %+v, want it as in the access log", cl.ID, cl.Src.Addr, ev)
		}
	}
	if len(evs) != len(closes) {
		t.Errorf("mantlet flows on node1: %d flows, want %d: %+v", len(evs), len(closes), evs)
	}
	sock := admin.SocketPath(filepath.Base(m.PinDir("node1")))
	c, err := admin.NewClient(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Ready || st.Snapshot.Enrolled != 2 || !st.Datapath.SkLookupAttached || !slices.Contains(st.Datapath.Listeners, "hbone") || st.Certs.Identities != 2 {
		t.Errorf("status of node1 through %s: %+v", sock, st)
	}
	if out := mantlet(t, m, "node1", "status"); !strings.Contains(out, "Ready:         yes") {
		t.Errorf("mantlet status on node1:\n%s", out)
	}
}

// matrixPolicies are the policies of the policy matrix: the server admits
// only the client, on 8080, and only mutual TLS; the neighbour refuses
// the client on 8081.
const matrixPolicies = `
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: server-allow-client}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from:
    - principals: ["spiffe://cluster.local/ns/shop/sa/client"]
    to:
      ports: [8080]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: server-strict}
spec:
  selector: {matchLabels: {app: server}}
  mtls: STRICT
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: neighbour-deny-client}
spec:
  selector: {matchLabels: {app: neighbour}}
  action: DENY
  rules:
  - from:
    - principals: ["spiffe://cluster.local/ns/shop/sa/client"]
    to:
      ports: [8081]
`

// reaches reports whether pod can talk to addr: an echo comes back. A
// connection that is dropped, or accepted and then closed by the ztunnel
// (a denial), does not.
func reaches(m *meshtest.Mesh, pod string, addr netip.AddrPort) bool {
	ctx, cancel := context.WithTimeout(context.Background(), dropWait)
	defer cancel()
	c, err := m.Dial(ctx, pod, addr)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		return false
	}
	b := make([]byte, 1)
	n, _ := c.Read(b)
	return n == 1 && b[0] == 'x'
}

// TestPolicyCheckAgreesWithTheDataPathAndDenialsAreVisible puts policies
// in force and, for every cell of a small policy matrix (meshed sources
// across nodes and on one node, an unmeshed plaintext source; allow by
// policy, allow by default, deny by policy, no ALLOW matched, STRICT),
// checks that 'mantlet policy check' on the destination's node gives the
// verdict the data path enforced. A denied connection then shows in the
// metrics, the access log, the security events and
// 'mantlet flows --verdict denied', naming the policy and rule.
func TestPolicyCheckAgreesWithTheDataPathAndDenialsAreVisible(t *testing.T) {
	spec := observeSpec()
	spec.Nodes[0].Pods[1].Labels = map[string]string{"app": "neighbour"}
	spec.Nodes[0].Pods = append(spec.Nodes[0].Pods, testbed.PodSpec{Name: "legacy", Namespace: "legacy"})
	m := startMesh(t, spec, meshtest.Options{})
	for _, pod := range []string{"server", "neighbour"} {
		echo(t, m, pod, appPort)
		echo(t, m, pod, appPort+1)
	}
	f, err := os.OpenFile(m.ConfigPath, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(matrixPolicies); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, node := range []string{"node1", "node2"} {
		c := m.Admin(node)
		deadline := time.Now().Add(10 * time.Second)
		for {
			ps, err := c.Policies(context.Background())
			if err == nil && len(ps.Policies) == 3 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not put the 3 policies in force: %+v, %v", node, ps, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// STRICT reaches the data path when the agent re-enrolls the server.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ws, err := m.Admin("node2").Workloads(context.Background(), "shop")
		if err == nil && slices.ContainsFunc(ws, func(w admin.Workload) bool { return w.Name == "server" && w.Strict && w.State == "enrolled" }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node2 does not enforce STRICT for the server: %+v, %v", ws, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	addr := func(pod string, port uint16) netip.AddrPort { return netip.AddrPortFrom(m.Pod(pod).IP, port) }
	for _, c := range []struct {
		src, dst string
		port     uint16
		allowed  bool
		reason   string
		policy   string
	}{
		{"client", "server", appPort, true, "allowed-by-policy", "shop/server-allow-client"},
		{"client", "server", appPort + 1, false, "no-allow-matched", ""},
		{"neighbour", "server", appPort, false, "no-allow-matched", ""},
		{"legacy", "server", appPort, false, "denied-plaintext-strict", "shop/server-strict"},
		{"client", "neighbour", appPort, true, "allowed-by-default", ""},
		{"client", "neighbour", appPort + 1, false, "denied-by-policy", "shop/neighbour-deny-client"},
		{"server", "client", appPort + 1, true, "allowed-by-default", ""},
	} {
		name := fmt.Sprintf("%s -> %s:%d", c.src, c.dst, c.port)
		if c.dst == "client" {
			echo(t, m, "client", c.port)
		}
		got := reaches(m, c.src, addr(c.dst, c.port))
		res, err := m.Admin(m.Pod(c.dst).Node).Check(context.Background(), m.Pod(c.src).IP.String(), addr(c.dst, c.port).String(), 0)
		if err != nil {
			t.Errorf("%s: policy check: %v", name, err)
			continue
		}
		if got != c.allowed || res.Allowed != got || res.Reason != c.reason || res.Policy != c.policy {
			t.Errorf("%s: the data path %s it; policy check says %s (%s, policy %q); want %v, %s, %q",
				name, map[bool]string{true: "allowed", false: "refused"}[got], res.Verdict, res.Reason, res.Policy, c.allowed, c.reason, c.policy)
		}
	}

	// The denial client -> neighbour:8081 (same node), everywhere an
	// operator looks.
	id := func(pod string) string { i, _ := m.ID(pod); return i.String() }
	denied := traffic("source", "client", "shop", id("client"), "neighbour", "shop", id("neighbour"), "unknown", "mutual_tls", "policy_denied")
	waitSeries(t, m, "node1", "istio_tcp_connections_failed_total", denied, 1, 0)
	waitSeries(t, m, "node1", "mantlet_policy_decisions_total",
		map[string]string{"action": "deny", "reason": "denied-by-policy", "policy": "shop/neighbour-deny-client"}, 1, 0)
	waitSeries(t, m, "node1", "mantlet_policy_decisions_total",
		map[string]string{"action": "deny", "reason": "no-allow-matched", "policy": ""}, 2, 0)
	waitSeries(t, m, "node2", "mantlet_policy_decisions_total",
		map[string]string{"action": "allow", "reason": "allowed-by-policy", "policy": "shop/server-allow-client"}, 1, 0)
	// Plaintext from another node is captured to node2's ztunnel, which
	// refuses it with an event; the kernel's STRICT drop is what stops it
	// when that capture is off (--inbound-plaintext=false).
	strictEvent := slices.ContainsFunc(m.Records("node2"), func(r map[string]any) bool {
		return r["kind"] == "security_event" && r["reason"] == "denied-plaintext-strict"
	})
	if n := counters(t, m, "node2").StrictDrops; n == 0 && !strictEvent {
		t.Error("node2 neither refused the plaintext connection in its ztunnel nor counted a STRICT drop")
	}

	isDenial := func(ev events.Flow) bool {
		return ev.Event == events.Close && ev.Verdict == events.Denied && ev.Policy == "shop/neighbour-deny-client" &&
			ev.Rule == 0 && ev.Reason == "denied-by-policy" && ev.ResponseFlag == "policy_denied" &&
			ev.Src.Identity == id("client") && ev.Dst.Workload == "neighbour"
	}
	if !slices.ContainsFunc(accessLog(m, "node1"), isDenial) {
		t.Errorf("node1's access log has no line for the denial:\n%v", accessLog(m, "node1"))
	}
	var evs []events.Flow
	if err := json.Unmarshal([]byte(mantlet(t, m, "node1", "flows", "--verdict", "denied", "-o", "json")), &evs); err != nil {
		t.Fatal(err)
	}
	if len(evs) != 3 || !slices.ContainsFunc(evs, isDenial) {
		t.Errorf("mantlet flows --verdict denied on node1 shows %d flows, want the 3 denials: %+v", len(evs), evs)
	}
	found := false
	for _, r := range m.Records("node1") {
		if r["kind"] == "security_event" && r["event"] == "deny" && r["verdict"] == "denied" && r["reason"] == "denied-by-policy" &&
			r["policy"] == "shop/neighbour-deny-client" && r["rule"] == 0.0 && r["node"] == "node1" {
			found = true
		}
	}
	if !found {
		t.Error("node1 wrote no security event for the denial")
	}
	if out := mantlet(t, m, "node1", "policy", "check", "--from", "shop/client", "--to", "shop/neighbour", "--port", "8081"); !strings.Contains(out, "denied by rule 0 of DENY policy shop/neighbour-deny-client") {
		t.Errorf("mantlet policy check on node1:\n%s", out)
	}
}
