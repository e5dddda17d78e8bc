//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// segmentationSpec is the cluster of the segmentation matrix: namespace
// shop (frontend and checkout on node1, payments and search on node2),
// namespace ops (batch on node2), both meshed, and an unmeshed legacy pod
// on node1.
func segmentationSpec() testbed.Spec {
	pod := func(name, ns string) testbed.PodSpec {
		return testbed.PodSpec{Name: name, Namespace: ns, ServiceAccount: name, Labels: map[string]string{"app": name}}
	}
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{pod("frontend", "shop"), pod("checkout", "shop"), pod("legacy", "legacy")}},
			{Name: "node2", Pods: []testbed.PodSpec{pod("payments", "shop"), pod("search", "shop"), pod("batch", "ops")}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS, "ops": meshedNS},
	}
}

// segmentationPolicies: mesh-wide default deny; checkout admits frontend
// (audited) and the legacy pod's address on 8080; payments admits checkout
// on 8443 only, refuses frontend outright and is STRICT; the whole shop
// namespace refuses ops; the whole ops namespace admits shop, 2
// connections at a time per workload; search admits frontend, 2 new
// connections a second (burst 3).
// %[1]s is the legacy pod's IP, %[2]d the port payments admits checkout on.
const segmentationPolicies = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: mantlet-system, name: mesh-default-deny}
spec: {defaultDeny: true}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: checkout-allow}
spec:
  selector: {matchLabels: {app: checkout}}
  action: ALLOW
  rules:
  - from:
    - principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]
    - ipBlocks: [{cidr: "%[1]s/32"}]
    to: {ports: [8080]}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: checkout-audit-frontend}
spec:
  selector: {matchLabels: {app: checkout}}
  action: AUDIT
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-allow-checkout}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/checkout"]}]
    to: {ports: [%[2]d]}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-deny-frontend}
spec:
  selector: {matchLabels: {app: payments}}
  action: DENY
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-strict}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: STRICT
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: shop-deny-ops}
spec:
  action: DENY
  rules:
  - from: [{namespaces: [ops]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: ops, name: ops-allow-shop}
spec:
  action: ALLOW
  rules:
  - from: [{namespaces: [shop]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: search-allow-frontend}
spec:
  selector: {matchLabels: {app: search}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]}]
  rateLimit: {connectionsPerSecond: 2, burst: 3}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: ops, name: ops-limits}
spec:
  rateLimit: {maxConnections: 2}
`

// writePolicies rewrites the cluster file whole (the testbed's objects
// followed by the policies) and waits until both agents put a new policy
// set in force.
func writePolicies(t *testing.T, m *meshtest.Mesh, policies string) {
	t.Helper()
	var before [2]uint64
	for i, node := range []string{"node1", "node2"} {
		ps, err := m.Admin(node).Policies(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		before[i] = ps.Generation
	}
	data := append(m.TB.Manifest(), "---\n"+policies...)
	tmp := filepath.Join(filepath.Dir(m.ConfigPath), ".policies-"+filepath.Base(m.ConfigPath))
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, m.ConfigPath); err != nil {
		os.Remove(tmp)
		t.Fatal(err)
	}
	for i, node := range []string{"node1", "node2"} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			ps, err := m.Admin(node).Policies(context.Background())
			if err == nil && ps.Generation > before[i] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not put the new policies in force (generation %d): %v", node, ps.Generation, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// secEvent is a security event as the agent writes it.
type secEvent struct {
	Event, Stage, Reason, Flag string
	Policy                     string // the deciding policy; for an AUDIT hit, the AUDIT policy
	SrcID, SrcIP, DstWorkload  string
	DstPort                    int
}

// securityEvents returns node's security events so far.
func securityEvents(m *meshtest.Mesh, node string) []secEvent {
	var out []secEvent
	for _, line := range strings.Split(m.Logs(node), "\n") {
		var f events.Flow
		if !strings.HasPrefix(line, `{"v":1,`) || json.Unmarshal([]byte(line), &f) != nil || f.Kind != events.KindSecurityEvent {
			continue
		}
		e := secEvent{Event: f.Event, Stage: f.Stage, Reason: f.Reason, Flag: f.ResponseFlag, Policy: f.Policy,
			SrcID: f.Src.Identity, SrcIP: f.Src.Addr.Addr().String(), DstWorkload: f.Dst.Workload, DstPort: int(f.Dst.Addr.Port())}
		if f.Event == events.Audit {
			e.Policy = f.AuditPolicy
		}
		out = append(out, e)
	}
	return out
}

// waitEvent waits until node wrote a security event that match accepts.
func waitEvent(t *testing.T, m *meshtest.Mesh, node string, match func(secEvent) bool) secEvent {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, e := range securityEvents(m, node) {
			if match(e) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s wrote no matching security event; it wrote %+v", node, securityEvents(m, node))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSegmentationMatrix puts the policies of segmentationPolicies in
// force on a two-node mesh and checks one cell per row: whether the
// connection works, and for every refusal (and AUDIT hit) the security
// event of the node that decided, naming the verdict, reason, policy,
// source and destination. Then, on the same mesh: a source that skips the
// source ztunnel's pre-check gets HBONE 401 from the destination; a burst
// trips the rate limit, which recovers; a concurrency limit refuses the
// connection over it; and a policy edit cuts an open connection it now
// refuses within about a second.
func TestSegmentationMatrix(t *testing.T) {
	m := startMesh(t, segmentationSpec(), meshtest.Options{AgentArgs: []string{"--inbound-plaintext-local"}})
	for _, p := range []string{"frontend", "checkout", "payments", "search", "batch"} {
		for _, port := range []uint16{8080, 8443, 9090} {
			echo(t, m, p, port)
		}
	}
	legacyIP := m.Pod("legacy").IP
	writePolicies(t, m, fmt.Sprintf(segmentationPolicies, legacyIP, 8443))
	id := func(pod string) string { i, _ := m.ID(pod); return i.String() }
	addr := func(pod string, port uint16) netip.AddrPort { return netip.AddrPortFrom(m.Pod(pod).IP, port) }

	type cell struct {
		src, dst string
		port     uint16
		allowed  bool
		// The security event expected on node (none when event is "").
		node, event, stage, reason, policy string
	}
	for _, c := range []cell{
		{"frontend", "checkout", 8080, true, "node1", "audit", "connect", "allowed-by-policy", "shop/checkout-audit-frontend"},
		{"frontend", "checkout", 9090, false, "node1", "deny", "connect", "no-allow-matched", ""},
		{"frontend", "payments", 8443, false, "node1", "deny", "precheck", "denied-by-policy", "shop/payments-deny-frontend"},
		{"checkout", "payments", 8443, true, "", "", "", "", ""},
		{"checkout", "payments", 9090, false, "node1", "deny", "precheck", "no-allow-matched", ""},
		{"frontend", "batch", 8080, true, "", "", "", "", ""},
		{"batch", "checkout", 8080, false, "node2", "deny", "precheck", "denied-by-policy", "shop/shop-deny-ops"},
		{"checkout", "frontend", 8080, false, "node1", "deny", "connect", "denied-by-default-deny", ""},
		{"payments", "frontend", 8080, false, "node2", "deny", "precheck", "denied-by-default-deny", ""},
		{"legacy", "payments", 8443, false, "node2", "deny", "connect", "denied-plaintext-strict", "shop/payments-strict"},
		{"legacy", "checkout", 8080, true, "", "", "", "", ""},
		{"legacy", "checkout", 9090, false, "node1", "deny", "connect", "no-allow-matched", ""},
	} {
		name := fmt.Sprintf("%s -> %s:%d", c.src, c.dst, c.port)
		if got := reaches(m, c.src, addr(c.dst, c.port)); got != c.allowed {
			t.Errorf("%s: connected %v, want %v", name, got, c.allowed)
			continue
		}
		if c.event == "" {
			continue
		}
		srcIP := m.Pod(c.src).IP.String()
		srcID := id(c.src)
		if c.src == "legacy" {
			srcID = ""
		}
		e := waitEvent(t, m, c.node, func(e secEvent) bool {
			return e.Event == c.event && e.SrcIP == srcIP && e.DstWorkload == c.dst && e.DstPort == int(c.port)
		})
		if e.Stage != c.stage || e.Reason != c.reason || e.Policy != c.policy || e.SrcID != srcID {
			t.Errorf("%s: event %+v; want stage %s, reason %s, policy %q, source %q", name, e, c.stage, c.reason, c.policy, srcID)
		}
	}
	// The plaintext the legacy pod sent went through the ztunnel of
	// checkout's node, which delivered it from the legacy pod's address.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := m.WaitFlow(ctx, "node1", func(f meshtest.Flow) bool {
		return f.Direction == "inbound_plaintext" && f.Src.Addr() == legacyIP && f.Dst == addr("checkout", 8080) && f.Flag == "-"
	}); err != nil {
		t.Errorf("node1's ztunnel did not carry legacy -> checkout:8080: %v", err)
	}

	t.Run("the destination refuses with HBONE 401 what the source did not pre-check", func(t *testing.T) {
		status := connectDirectly(t, m, "frontend", addr("payments", 8443))
		if status != 401 {
			t.Fatalf("CONNECT answered %d, want 401", status)
		}
		waitEvent(t, m, "node2", func(e secEvent) bool {
			return e.Stage == "connect" && e.Reason == "denied-by-policy" && e.Policy == "shop/payments-deny-frontend" && e.SrcID == id("frontend")
		})
	})

	t.Run("a burst trips the rate limit, which recovers", func(t *testing.T) {
		time.Sleep(1500 * time.Millisecond) // a full bucket
		var got []bool
		for range 8 {
			got = append(got, reaches(m, "frontend", addr("search", 8080)))
		}
		ok := 0
		for _, g := range got {
			if g {
				ok++
			}
		}
		if ok < 3 || ok > 4 || !got[0] || got[len(got)-1] {
			t.Fatalf("burst of 8: %v; want the first 3 (the burst, perhaps one more refilled) through and the rest refused", got)
		}
		waitEvent(t, m, "node2", func(e secEvent) bool {
			return e.Reason == "rate-limited" && e.Flag == "rate_limited" && e.Policy == "shop/search-allow-frontend" && e.SrcID == id("frontend")
		})
		time.Sleep(time.Second)
		if !reaches(m, "frontend", addr("search", 8080)) {
			t.Fatal("still refused a second after the burst")
		}
	})

	t.Run("a third concurrent connection is over maxConnections", func(t *testing.T) {
		for range 2 {
			c := dial(t, m, "frontend", addr("batch", 8443))
			ping(t, c, "held")
		}
		if reaches(m, "frontend", addr("batch", 8443)) {
			t.Fatal("a third concurrent connection got through")
		}
		waitEvent(t, m, "node2", func(e secEvent) bool {
			return e.Reason == "max-connections" && e.Flag == "max_connections" && e.Policy == "ops/ops-limits" && e.DstWorkload == "batch"
		})
	})

	t.Run("a policy edit cuts an open connection it now refuses", func(t *testing.T) {
		c := dial(t, m, "checkout", addr("payments", 8443))
		ping(t, c, "before the edit")
		start := time.Now()
		writePolicies(t, m, fmt.Sprintf(segmentationPolicies, legacyIP, 9443))
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadAll(c)
		took := time.Since(start)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("the connection stayed open after the edit")
		}
		t.Logf("file rewritten to connection closed: %v", took)
		if took > 2*time.Second {
			t.Errorf("the connection closed %v after the edit, want about a second at most", took)
		}
		waitEvent(t, m, "node2", func(e secEvent) bool {
			return e.Stage == "reevaluate" && e.Reason == "no-allow-matched" && e.SrcID == id("checkout") && e.DstPort == 8443
		})
		if reaches(m, "checkout", addr("payments", 8443)) {
			t.Error("a new connection checkout -> payments:8443 works after the edit")
		}
	})
}

// connectDirectly opens an HBONE connection to dst's node with src's SVID,
// as a ztunnel that skips the pre-check would, and returns the status of
// a CONNECT to dst.
func connectDirectly(t *testing.T, m *meshtest.Mesh, src string, dst netip.AddrPort) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srcID, _ := m.ID(src)
	svid, err := m.IssueSVID(ctx, srcID)
	if err != nil {
		t.Fatal(err)
	}
	// From the source's node itself: a connection from the pod would be
	// captured by that node's ztunnel.
	node := m.Node(m.Pod(src).Node)
	pool := hbone.NewPool(hbone.PoolConfig{
		SVID:    func(context.Context, spiffeid.ID) (*x509svid.SVID, error) { return svid, nil },
		Bundles: m.Bundle(),
		Dial: func(ctx context.Context, _ netip.Addr, to netip.AddrPort) (net.Conn, error) {
			return node.Dial(ctx, "tcp4", to.String())
		},
	})
	defer pool.Close()
	var dstPod string
	for _, p := range []string{"payments", "search", "batch", "frontend", "checkout"} {
		if m.Pod(p).IP == dst.Addr() {
			dstPod = p
		}
	}
	dstID, _ := m.ID(dstPod)
	cs, err := pool.Connect(ctx, &hbone.Request{
		Key:    hbone.Key{Src: srcID, Dst: dstID, DstIP: dst.Addr()},
		Addr:   netip.AddrPortFrom(dst.Addr(), meshtest.HBONEPort),
		Target: dst,
		Body:   strings.NewReader(""),
	})
	if err == nil {
		cs.Close()
		return 200
	}
	var re *hbone.RefusedError
	if errors.As(err, &re) {
		return re.Status
	}
	t.Fatalf("CONNECT %s from %s: %v", dst, src, err)
	return 0
}
