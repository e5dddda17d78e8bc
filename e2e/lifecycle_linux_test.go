package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// TestAgentsFailClosedAndAdoptTheirPinsOnRestart kills the agents with
// SIGKILL (a crash), the destination node's first, then the source's, and
// restarts them. What it proves, precisely:
//
//   - With the destination node's agent down, a meshed pod's new
//     connection is accepted by its own node's ztunnel, whose HBONE attempt
//     (to the destination pod's IP, port 15008) the destination node drops
//     and counts; the client sees its connection reset without an answer
//     (accept-then-reset: it reads ECONNRESET, not an end of data), and
//     what it sent never crosses the underlay in clear, nor does any SYN to
//     the application port.
//   - With no agent running on the source node either, a meshed pod's new connection to a meshed pod
//     of the other node fails within a second and a half and nothing of
//     it reaches the underlay: no SYN to the application port in
//     plaintext (and no HBONE either); the node counts it as dropped for
//     want of a listener. The data path fails closed.
//   - Connections that the data path lets through without the ztunnel
//     survive the crash and keep carrying bytes while no agent runs and
//     after the restart, because the programs stay attached and the maps
//     pinned: a meshed pod's connection to an excluded port, and an
//     unmeshed pod's plaintext to a meshed PERMISSIVE pod. (The agents run
//     with --inbound-plaintext=false for that: by default plaintext from
//     other nodes is carried by the destination's ztunnel, so that policy
//     applies to it, and it then ends with the ztunnel like any proxied
//     connection.)
//   - A connection carried by the ztunnel ends with the ztunnel's process
//     (it is that process's sockets); it is reset, it does not continue in
//     plaintext. DESIGN's "established connections keep working while the
//     agent restarts" holds for the data path, not for proxied streams.
//   - The restarted agents adopt the pins: the agent says so for each pod,
//     and every hook holds exactly one program (pod veth ingress and
//     egress, uplink ingress, sk_lookup in the node's namespace); new
//     meshed connections work again.
func TestAgentsFailClosedAndAdoptTheirPinsOnRestart(t *testing.T) {
	const excludedPort = 9000
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "client", Namespace: "shop", ServiceAccount: "client"},
				{Name: "legacy", Namespace: "plain"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server"},
				{Name: "outside", Namespace: "plain"},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{AgentArgs: []string{"--exclude-port", fmt.Sprint(excludedPort), "--inbound-plaintext=false"}})
	srv := echo(t, m, "server", appPort)
	outside := echo(t, m, "outside", excludedPort)
	client := m.Pod("client")

	excluded := dial(t, m, "client", outside.Addr)
	plain := dial(t, m, "legacy", srv.Addr)
	proxied := dial(t, m, "client", srv.Addr)
	ping(t, excluded, "before")
	ping(t, plain, "before")
	ping(t, proxied, "before")
	if c := counters(t, m, "node1"); c.Excluded == 0 || c.LookupOutbound != 1 {
		t.Fatalf("node1 counters %+v: want the excluded connection seen and only the proxied one captured", c)
	}

	// 1. The destination node's agent crashes.
	if err := m.KillAgent("node2"); err != nil {
		t.Fatal(err)
	}
	// The proxied connection ends with node2's ztunnel.
	_ = proxied.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := proxied.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("proxied connection after node2's crash: read %d bytes, %v; want it reset", n, err)
	}
	// A new meshed connection is accepted by node1's ztunnel, whose HBONE
	// connection attempt node2 drops; the client sees its connection
	// reset without an answer, and its bytes never cross in clear.
	marker := newMarker(t)
	before2 := counters(t, m, "node2")
	stop := capture(t, m)
	c := dial(t, m, "client", srv.Addr)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	// The reset is reported by the first call after it arrived: the write
	// if it came that early, else the read.
	_, werr := io.WriteString(c, marker)
	answer, err := io.ReadAll(c)
	pkts := stop()
	if len(answer) > 0 || !errors.Is(err, syscall.ECONNRESET) && !errors.Is(werr, syscall.ECONNRESET) {
		t.Errorf("with node2's agent down the client wrote (%v) and read %q, %v; want its connection reset without an answer", werr, answer, err)
	}
	if testbed.Contains(pkts, []byte(marker)) {
		t.Error("with node2's agent down the marker crossed the underlay in clear")
	}
	if s := syns(pkts, srv.Addr); len(s) > 0 {
		t.Errorf("with node2's agent down, %d connection attempts to the application port crossed the underlay", len(s))
	}
	hbone := netip.AddrPortFrom(srv.Addr.Addr(), meshtest.HBONEPort)
	if len(syns(pkts, hbone)) == 0 {
		t.Errorf("no HBONE connection attempt to %s on the underlay", hbone)
	}
	if after := counters(t, m, "node2"); after.NoListener <= before2.NoListener {
		t.Errorf("node2 counted no HBONE connection dropped for want of a listener: %d -> %d", before2.NoListener, after.NoListener)
	}

	// 2. The source node's agent crashes too.
	if err := m.KillAgent("node1"); err != nil {
		t.Fatal(err)
	}

	// New meshed connections fail closed at the source.
	before := counters(t, m, "node1")
	stop = capture(t, m)
	dialFails(t, m, "client", srv.Addr)
	pkts = stop()
	if s := syns(pkts, netip.AddrPortFrom(srv.Addr.Addr(), 0)); len(s) > 0 {
		t.Errorf("with no agent, %d connection attempts to the server crossed the underlay: %+v", len(s), s)
	}
	for _, p := range pkts {
		if p.Src.Addr() == client.IP && p.Dst.Port() != excludedPort {
			t.Errorf("with no agent, the client sent %s -> %s %s on the underlay", p.Src, p.Dst, p.Flags)
		}
	}
	if after := counters(t, m, "node1"); after.NoListener <= before.NoListener {
		t.Errorf("node1 counted no drop for want of a listener: %d -> %d", before.NoListener, after.NoListener)
	}

	// What the data path passes without the ztunnel keeps working.
	ping(t, excluded, "while no agent runs")
	ping(t, plain, "while no agent runs")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, n := range []string{"node1", "node2"} {
		if err := m.StartAgent(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	for _, pod := range []string{"client", "server"} {
		p := m.Pod(pod)
		// The agent is ready once the pod is enrolled; its log line
		// reaches the harness through a pipe, a moment later.
		waitFor(t, "the restarted agent of "+p.Node+" adopting "+pod+"'s pinned programs", func() (bool, string) {
			// The last enrollment: the records include the agent's
			// first run, which enrolled the pod from scratch.
			var last map[string]any
			for _, r := range m.Records(p.Node) {
				if r["msg"] == "pod enrolled" && r["pod"] == "shop/"+pod {
					last = r
				}
			}
			return last != nil && last["adopted"] == true, fmt.Sprintf("last enrollment logged: %v", last)
		})
		got, err := m.AttachedPrograms(p.Node, p.HostVeth)
		if err != nil {
			t.Fatal(err)
		}
		if got != (meshtest.Attached{Ingress: 1, Egress: 1}) {
			t.Errorf("%s's veth holds %+v programs after the restart, want one per hook", pod, got)
		}
	}
	for _, n := range m.TB.Nodes() {
		if got, err := m.AttachedPrograms(n.Name, n.Uplink); err != nil || got != (meshtest.Attached{Ingress: 1, Egress: 1}) {
			t.Errorf("%s's uplink holds %+v programs (%v), want one per hook (capture, guard)", n.Name, got, err)
		}
		if got, err := m.SkLookupPrograms(n.Name); err != nil || got != 1 {
			t.Errorf("%s's namespace holds %d sk_lookup programs (%v), want one", n.Name, got, err)
		}
	}

	ping(t, excluded, "after the restart")
	ping(t, plain, "after the restart")
	c = dial(t, m, "client", srv.Addr)
	roundTrip(t, c, randomBytes(t, 1<<20))
	if _, err := m.WaitFlow(ctx, "node2", func(f meshtest.Flow) bool {
		return f.Direction == "inbound" && f.Src.Addr() == client.IP && f.Flag == "-"
	}); err != nil {
		t.Errorf("after the restart the new connection did not go through node2's ztunnel: %v", err)
	}
}

// TestAnnotatingANamespaceEnrollsItsPodsAtRuntime edits the cluster file
// the running agents watch: annotating a namespace mantlet.io/mesh=enabled
// enrolls its pods on both nodes (their traffic becomes HBONE between the
// pods' identities, the marker disappears from the underlay), removing the
// annotation un-enrolls them (plaintext again, nothing captured).
func TestAnnotatingANamespaceEnrollsItsPodsAtRuntime(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "web", Namespace: "late", ServiceAccount: "web"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "db", Namespace: "late", ServiceAccount: "db"}}},
		},
	}
	m := startMesh(t, spec, meshtest.Options{})
	db := echo(t, m, "db", appPort)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// send sends a marker from web to db and reports whether it crossed the
	// underlay in clear and whether node1 captured the connection.
	send := func(t *testing.T) (clear, captured bool) {
		t.Helper()
		before := counters(t, m, "node1")
		marker := newMarker(t)
		stop := capture(t, m)
		c := dial(t, m, "web", db.Addr)
		ping(t, c, marker)
		c.Close()
		pkts := stop()
		after := counters(t, m, "node1")
		return testbed.Contains(pkts, []byte(marker)), after.LookupOutbound > before.LookupOutbound
	}
	ready := func(t *testing.T, node string, enrolled int) {
		t.Helper()
		st, err := m.Status(ctx, node)
		if err == nil {
			err = meshtest.CheckSettled(st, enrolled)
		}
		if err != nil {
			t.Errorf("%s: %v", node, err)
		}
	}

	t.Run("not annotated: plaintext", func(t *testing.T) {
		ready(t, "node1", 0)
		if clear, captured := send(t); !clear || captured {
			t.Errorf("marker in clear = %v, captured = %v; want plaintext, not captured", clear, captured)
		}
	})
	t.Run("annotated: enrolled", func(t *testing.T) {
		if err := m.SetNamespaceAnnotations(ctx, "late", meshedNS); err != nil {
			t.Fatal(err)
		}
		ready(t, "node1", 1)
		ready(t, "node2", 1)
		if clear, captured := send(t); clear || !captured {
			t.Errorf("marker in clear = %v, captured = %v; want captured and tunnelled", clear, captured)
		}
		web, _ := m.ID("web")
		dbID, _ := m.ID("db")
		f, err := m.WaitFlow(ctx, "node2", func(f meshtest.Flow) bool { return f.Direction == "inbound" && f.Dst == db.Addr })
		if err != nil {
			t.Fatal(err)
		}
		if f.Path != "hbone" || f.SrcID != web.String() || f.DstID != dbID.String() {
			t.Errorf("node2 recorded %+v; want HBONE from %s to %s", f, web, dbID)
		}
	})
	t.Run("annotation removed: plaintext again", func(t *testing.T) {
		if err := m.SetNamespaceAnnotations(ctx, "late", nil); err != nil {
			t.Fatal(err)
		}
		ready(t, "node1", 0)
		ready(t, "node2", 0)
		if clear, captured := send(t); !clear || captured {
			t.Errorf("marker in clear = %v, captured = %v; want plaintext, not captured", clear, captured)
		}
	})
}
