package e2e

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// TestFailClosedWhateverBreaksOnTheNode takes away, one at a time, each
// piece of node1's kernel state that capture rests on, the way another
// tool, a CNI restart or a person would: the routing rule, the capture
// table, its route, lo, the pod's tc program, the sk_lookup program. For
// each:
//
//  1. With node1's agent frozen (SIGSTOP: its sockets stay, it does
//     nothing), so that the kernel alone decides, a meshed pod sends a
//     marker to a meshed pod of node2 while the underlay is captured: the
//     marker never crosses in clear and no SYN to the application port
//     leaves the node. Either the connection is dropped and the drop
//     counted (route_dropped, leak_dropped), or it is still captured and
//     carried over HBONE once the agent runs again.
//  2. Thawed, the agent puts the piece back (mantlet_datapath_repairs_total
//     counts it, readiness answers 200 again).
//  3. With the agent running, the same fault is repaired on its own; the
//     time it took is logged, and a new marker crosses only inside mTLS.
func TestFailClosedWhateverBreaksOnTheNode(t *testing.T) {
	m, srv, node := clientServerMesh(t)
	ping(t, dial(t, m, "client", srv.Addr), "before")

	ip := func(args ...string) func(t *testing.T) {
		return func(t *testing.T) {
			if out, err := node.Command(context.Background(), "ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
			}
		}
	}
	detach := func(pin func() string) func(t *testing.T) {
		return func(t *testing.T) {
			l, err := link.LoadPinnedLink(pin(), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			if err := l.Detach(); err != nil {
				t.Fatalf("detach %s: %v", pin(), err)
			}
		}
	}
	links := filepath.Join(m.PinDir("node1"), "links")
	podIngress := func() string {
		var idx int
		err := node.Do(func() error {
			l, err := netlink.LinkByName(m.Pod("client").HostVeth)
			if err == nil {
				idx = l.Attrs().Index
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return filepath.Join(links, fmt.Sprintf("if%d-pod-ingress", idx))
	}
	table := strconv.Itoa(bpf.DefaultRouteTable)
	for _, f := range []struct {
		name  string
		fault bpf.Fault
		apply func(t *testing.T)
		drop  string // the counter that must rise; "" when capture goes on
	}{
		{"ip rule del", bpf.FaultRule, ip("rule", "del", "priority", strconv.Itoa(bpf.DefaultRulePriority)), "route_dropped"},
		{"ip route flush table", bpf.FaultRoute, ip("route", "flush", "table", table), "route_dropped"},
		{"ip route del", bpf.FaultRoute, ip("route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", table), "route_dropped"},
		{"ip link set lo down", bpf.FaultLoopback, ip("link", "set", "lo", "down"), ""},
		{"pod_ingress detached", bpf.FaultAttachment, detach(podIngress), "leak_dropped"},
		{"sk_lookup detached", bpf.FaultSkLookup, detach(func() string { return filepath.Join(links, "sk_lookup") }), ""},
	} {
		t.Run(f.name, func(t *testing.T) {
			// 1. The kernel alone.
			repairs := repairCount(t, m, "node1", f.fault)
			thaw, err := m.FreezeAgent("node1")
			if err != nil {
				t.Fatal(err)
			}
			before := counters(t, m, "node1")
			f.apply(t)
			marker := newMarker(t)
			stop := capture(t, m)
			var c io.ReadWriter
			if f.drop != "" {
				dialFails(t, m, "client", srv.Addr)
			} else {
				conn := dial(t, m, "client", srv.Addr) // the kernel accepts for the frozen ztunnel
				if _, err := io.WriteString(conn, marker); err != nil {
					t.Fatal(err)
				}
				c = conn
			}
			after := counters(t, m, "node1")

			// 2. The agent, thawed, repairs.
			thawed := time.Now()
			if err := thaw(); err != nil {
				t.Fatal(err)
			}
			waitRepaired(t, m, "node1", f.fault, repairs)
			t.Logf("%s: repaired %v after the agent was thawed", f.name, time.Since(thawed).Round(time.Millisecond))
			if c != nil {
				buf := make([]byte, len(marker))
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != marker {
					t.Errorf("the connection captured during the fault: read %q (%v), want the echo of the marker", buf, err)
				}
			}
			pkts := stop()
			if testbed.Contains(pkts, []byte(marker)) {
				t.Error("the marker crossed the underlay in clear")
			}
			if s := syns(pkts, srv.Addr); len(s) > 0 {
				t.Errorf("%d connection attempts to the application port crossed the underlay: %+v", len(s), s)
			}
			if f.drop != "" && event(after, f.drop) <= event(before, f.drop) {
				t.Errorf("%s did not rise: %d -> %d", f.drop, event(before, f.drop), event(after, f.drop))
			}

			// 3. The agent running: it repairs on its own.
			repairs = repairCount(t, m, "node1", f.fault)
			start := time.Now()
			f.apply(t)
			waitRepaired(t, m, "node1", f.fault, repairs)
			t.Logf("%s: repaired %v after the fault, the agent running", f.name, time.Since(start).Round(time.Millisecond))
			marker = newMarker(t)
			stop = capture(t, m)
			ping(t, dial(t, m, "client", srv.Addr), marker)
			if pkts := stop(); testbed.Contains(pkts, []byte(marker)) {
				t.Error("after the repair the marker crossed the underlay in clear")
			}
		})
	}
}

// TestFailClosedWhenTheAgentStopsAndAgainstStrayCommands: a stopped
// agent (SIGTERM, as a rolling update does) leaves its pods' new
// connections dropped and counted, never sent in clear. The report's
// fail-open path cannot be taken any more: a second agent started in the
// node's namespace is refused before it loads anything, an agent started
// with a node name the cluster file lacks is refused before it loads
// anything, and a clean-up of a pin directory that holds nothing says so,
// names the node's real one, and leaves the running agent's routing alone.
func TestFailClosedWhenTheAgentStopsAndAgainstStrayCommands(t *testing.T) {
	m, srv, node := clientServerMesh(t)
	mantlet := func(args ...string) (string, error) {
		out, err := node.Command(context.Background(), binary, args...).CombinedOutput()
		return string(out), err
	}
	stray := filepath.Join(bpf.DefaultPinRoot, m.TB.Prefix()+"-stray")
	for _, c := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"a second agent in the node's namespace", []string{"agent", "--node-name", "node1", "--config", m.ConfigPath, "--ca-dir", m.CADir,
			"--pin-dir", stray, "--admin-addr", "127.0.0.1:25000", "--metrics-addr", ":25020", "--ready-addr", ":25021"},
			1, "another agent runs in this network namespace: its pin dir is " + m.PinDir("node1")},
		{"a node name the cluster file lacks", []string{"agent", "--node-name", "nodeone", "--config", m.ConfigPath, "--ca-dir", m.CADir, "--pin-dir", stray},
			1, "--node-name nodeone: " + m.ConfigPath + " has no node of this name; its nodes are node1, node2"},
		{"a clean-up of a pin dir that holds nothing", []string{"agent", "--cleanup", "--node-name", "node1", "--pin-dir", stray},
			0, "nothing pinned at " + stray + ": nothing removed; data paths pinned for this network namespace: " + m.PinDir("node1")},
	} {
		out, err := mantlet(c.args...)
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, output:\n%s\nwant exit %d and %q", c.name, code, out, c.code, c.want)
		}
	}
	if left, _ := filepath.Glob(stray + "*"); len(left) > 0 {
		t.Errorf("the refused commands left pins behind: %v", left)
	}
	if out, err := node.Command(context.Background(), "ip", "-4", "rule", "show", "priority", strconv.Itoa(bpf.DefaultRulePriority)).Output(); err != nil || !strings.Contains(string(out), "lookup "+strconv.Itoa(bpf.DefaultRouteTable)) {
		t.Errorf("node1's routing rule after the stray commands: %q (%v)", out, err)
	}
	if n := repairCount(t, m, "node1", bpf.FaultRule) + repairCount(t, m, "node1", bpf.FaultRoute); n > 0 {
		t.Errorf("node1's agent had to repair its routing %d times after the stray commands, want none", n)
	}
	marker := newMarker(t)
	stop := capture(t, m)
	ping(t, dial(t, m, "client", srv.Addr), marker)
	if pkts := stop(); testbed.Contains(pkts, []byte(marker)) {
		t.Error("after the stray commands the marker crossed the underlay in clear")
	}

	// The agent stops: its listeners leave the SOCKMAP.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.StopAgent(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	before := counters(t, m, "node1")
	stop = capture(t, m)
	dialFails(t, m, "client", srv.Addr)
	pkts := stop()
	if s := syns(pkts, srv.Addr); len(s) > 0 {
		t.Errorf("with the agent stopped, %d connection attempts to the application port crossed the underlay", len(s))
	}
	if after := counters(t, m, "node1"); after.NoListener <= before.NoListener {
		t.Errorf("with the agent stopped, no drop was counted: no_listener_dropped %d -> %d", before.NoListener, after.NoListener)
	}
	if err := m.StartAgent(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	ping(t, dial(t, m, "client", srv.Addr), "after the restart")
}

// clientServerMesh starts a mesh of two nodes with a meshed client pod on
// node1 and a meshed echo server on node2 (port appPort).
func clientServerMesh(t *testing.T) (*meshtest.Mesh, *meshtest.Echo, *testbed.Node) {
	t.Helper()
	m := startMesh(t, testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server"}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}, meshtest.Options{})
	return m, echo(t, m, "server", appPort), m.Node("node1")
}

// event returns the counter of c named like the
// mantlet_datapath_packets_total event label.
func event(c bpf.Counters, name string) uint64 {
	for _, e := range c.Events() {
		if e.Name == name {
			return e.Value
		}
	}
	panic("no counter " + name)
}

// repairCount reads mantlet_datapath_repairs_total{fault} of node.
func repairCount(t *testing.T, m *meshtest.Mesh, node string, fault bpf.Fault) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mfs, err := m.Metrics(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	n, ok := mfs.Value("mantlet_datapath_repairs_total", map[string]string{"fault": string(fault)})
	if !ok {
		t.Fatalf("no mantlet_datapath_repairs_total{fault=%q} in node %s's metrics", fault, node)
	}
	return uint64(n)
}

// waitRepaired waits until node's agent has counted one more repair of
// fault than before and says it is ready again.
func waitRepaired(t *testing.T, m *meshtest.Mesh, node string, fault bpf.Fault, before uint64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if repairCount(t, m, node, fault) > before {
			st, err := m.Status(context.Background(), node)
			if err == nil && st.Ready {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s repaired but %s is not ready: %s (%v)", fault, node, st.Reason, err)
			}
		} else if time.Now().After(deadline) {
			t.Fatalf("%s of %s not repaired within 15 s", fault, node)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
