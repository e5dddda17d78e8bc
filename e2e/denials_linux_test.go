package e2e

import (
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// denyServer8080 refuses every connection to the server's port 8080.
const denyServer8080 = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: server-deny-8080}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: {ports: [8080]}
`

// deniedFlows returns what 'mantlet flows --verdict denied' shows on node.
func deniedFlows(t *testing.T, m *meshtest.Mesh, node string) []events.Flow {
	t.Helper()
	var evs []events.Flow
	if err := json.Unmarshal([]byte(mantlet(t, m, node, "flows", "--verdict", "denied", "--last", "0", "-o", "json")), &evs); err != nil {
		t.Fatal(err)
	}
	return evs
}

// waitDenied waits until 'mantlet flows --verdict denied' on node shows
// a flow that match accepts, and returns it.
func waitDenied(t *testing.T, m *meshtest.Mesh, node string, match func(events.Flow) bool) events.Flow {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := deniedFlows(t, m, node)
		if i := slices.IndexFunc(evs, match); i >= 0 {
			return evs[i]
		}
		if time.Now().After(deadline) {
			t.Fatalf("mantlet flows --verdict denied on %s shows no such flow: %+v", node, evs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDenialsShowOnTheNodeThatDecidedThem opens a connection from a pod
// of node1 to a pod of node2, then puts a DENY policy for its port in
// force. The open connection is cut by node2, the node that decided: its
// flow record, access log and 'mantlet flows --verdict denied' say
// denied, by the policy and rule. A new connection is refused by node1's
// pre-check, so that denial shows on node1 only; with the pre-check off,
// node2 refuses it with HBONE 401 and both nodes list it as denied, node2
// with the policy, node1 as denied-by-destination.
func TestDenialsShowOnTheNodeThatDecidedThem(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server", Labels: map[string]string{"app": "server"}}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	for _, tc := range []struct {
		name     string
		args     []string
		precheck bool
	}{
		{"with the source's pre-check", nil, true},
		{"without the pre-check", []string{"--no-policy-precheck"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startMesh(t, spec, meshtest.Options{AgentArgs: tc.args})
			echo(t, m, "server", appPort)
			dst := netip.AddrPortFrom(m.Pod("server").IP, appPort)
			c := dial(t, m, "client", dst)
			ping(t, c, "before the policy")
			src := netip.MustParseAddrPort(c.LocalAddr().String())

			writePolicies(t, m, denyServer8080)
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadAll(c); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the connection stayed open after the DENY")
			}
			byPolicy := func(ev events.Flow) bool {
				return ev.Verdict == events.Denied && ev.Policy == "shop/server-deny-8080" && ev.Rule == 0 &&
					ev.Reason == "denied-by-policy" && ev.ResponseFlag == "policy_denied" && ev.Dst.Addr == dst
			}
			// The cut: on node2, denied by the policy, with the bytes it
			// carried before.
			cut := waitDenied(t, m, "node2", func(ev events.Flow) bool { return ev.Src.Addr == src })
			if !byPolicy(cut) || cut.Direction != "inbound" || cut.BytesSent == 0 {
				t.Errorf("node2 lists the cut connection as %+v; want inbound, denied by rule 0 of shop/server-deny-8080, with its bytes", cut)
			}
			if !slices.ContainsFunc(accessLog(m, "node2"), func(ev events.Flow) bool {
				return ev.Event == events.Close && ev.Src.Addr == src && byPolicy(ev)
			}) {
				t.Errorf("node2's access log has no close line denying the cut connection: %+v", accessLog(m, "node2"))
			}
			// node1 only saw its tunnel end.
			if slices.ContainsFunc(deniedFlows(t, m, "node1"), func(ev events.Flow) bool { return ev.Src.Addr == src }) {
				t.Errorf("node1 lists the connection node2 cut as denied: %+v", deniedFlows(t, m, "node1"))
			}

			if reaches(m, "client", dst) {
				t.Fatal("a new connection got through the DENY")
			}
			toDst := func(ev events.Flow) bool { return ev.Src.Addr != src && ev.Dst.Addr == dst }
			if tc.precheck {
				ev := waitDenied(t, m, "node1", toDst)
				if !byPolicy(ev) || ev.Direction != "outbound" {
					t.Errorf("node1 lists the new connection as %+v; want outbound, denied by rule 0 of shop/server-deny-8080", ev)
				}
				if evs := deniedFlows(t, m, "node2"); slices.ContainsFunc(evs, toDst) {
					t.Errorf("node2 lists a connection it never saw: %+v", evs)
				}
				return
			}
			ev := waitDenied(t, m, "node2", toDst)
			if !byPolicy(ev) || ev.Direction != "inbound" || ev.BytesSent != 0 {
				t.Errorf("node2 lists the new connection as %+v; want inbound, denied by rule 0 of shop/server-deny-8080", ev)
			}
			ev = waitDenied(t, m, "node1", toDst)
			if ev.Reason != "denied-by-destination" || ev.ResponseFlag != "hbone_refused" || ev.Policy != "" || ev.Direction != "outbound" {
				t.Errorf("node1 lists the connection node2 refused as %+v; want outbound, hbone_refused, denied-by-destination, no policy", ev)
			}
		})
	}
}
