// Package admintest runs an admin API server in-process over a small,
// fixed cluster (two nodes, a shop namespace with policies, a legacy
// unmeshed pod), for the tests of the admin client and of the operator
// commands. No root is needed: the server listens on a unix socket in a
// temporary directory.
package admintest

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/telemetry"
)

// Now is the fixture's clock.
var Now = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

// The fixture's cluster. node-a runs frontend-0 (shop/frontend),
// checkout-0 (shop/checkout) and legacy-0 (namespace legacy, not meshed);
// node-b runs payments-0 (shop/payments, label app=payments). Service
// shop/payments (198.18.128.10:443 → 8443) fronts payments-0.
const Policies = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-allow-checkout}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from:
    - principals: ["spiffe://cluster.local/ns/shop/sa/checkout"]
    to:
      ports: [8443]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: deny-legacy}
spec:
  action: DENY
  rules:
  - from:
    - ipBlocks: [{cidr: 198.19.1.30/32}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: checkout-strict}
spec:
  selector: {matchLabels: {app: checkout}}
  mtls: STRICT
`

// Addresses of the fixture's pods.
var (
	FrontendIP  = netip.MustParseAddr("198.19.1.10")
	CheckoutIP  = netip.MustParseAddr("198.19.1.20")
	LegacyIP    = netip.MustParseAddr("198.19.1.30")
	PaymentsIP  = netip.MustParseAddr("198.19.2.10")
	PaymentsVIP = netip.MustParseAddr("198.18.128.10")
)

// Fixture is a running admin server over the fixed cluster.
type Fixture struct {
	// Addr is the server's unix socket, as the --admin flag takes it.
	Addr   string
	Server *admin.Server
	Engine *policy.Engine
	Flows  *telemetry.FlowLog
	Store  *workload.Store
	// Certs is what the certificate source returns; tests may change it
	// before a request.
	Certs []identity.CertInfo
	// Pods is the agent's view of node-a's pods.
	Pods []agent.PodStatus
	// Ready and Reason are the readiness answer.
	Ready  bool
	Reason string
	// DP is the data path's state.
	DP *Datapath
	// Config is the cluster file's reload state.
	Config source.Status
}

// Datapath is a fake data path.
type Datapath struct {
	St    bpf.Status
	N     bpf.Counters
	Err   error
	Fixed map[bpf.Fault]uint64
}

// Status implements admin.Datapath.
func (d *Datapath) Status() bpf.Status { return d.St }

// Counters implements admin.Datapath.
func (d *Datapath) Counters() (bpf.Counters, error) { return d.N, d.Err }

// Repairs implements admin.Datapath.
func (d *Datapath) Repairs() map[bpf.Fault]uint64 { return d.Fixed }

// New starts the fixture's server as node-a; it stops when the test ends.
func New(t testing.TB) *Fixture {
	t.Helper()
	td := identity.DefaultTrustDomain
	wl := func(uid, ns, name, sa, node string, ip netip.Addr, enrolled bool, labels map[string]string) workload.Workload {
		return workload.Workload{UID: uid, Name: name, Namespace: ns, ServiceAccount: sa, Node: node,
			IPs: []netip.Addr{ip}, Enrolled: enrolled, Labels: labels}
	}
	snap, err := workload.New(
		[]workload.Node{{Name: "node-a", IP: netip.MustParseAddr("198.18.0.1")}, {Name: "node-b", IP: netip.MustParseAddr("198.18.0.2")}},
		[]workload.Workload{
			wl("f", "shop", "frontend-0", "frontend", "node-a", FrontendIP, true, map[string]string{"app": "frontend"}),
			wl("c", "shop", "checkout-0", "checkout", "node-a", CheckoutIP, true, map[string]string{"app": "checkout"}),
			wl("l", "legacy", "legacy-0", "", "node-a", LegacyIP, false, nil),
			wl("p", "shop", "payments-0", "payments", "node-b", PaymentsIP, true, map[string]string{"app": "payments"}),
		},
		[]workload.Service{{Name: "payments", Namespace: "shop", VIPs: []netip.Addr{PaymentsVIP},
			Ports: []workload.ServicePort{{Name: "https", Port: 443, TargetPort: 8443}}, Endpoints: []string{"p"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	store := workload.NewStore()
	store.Replace(snap)
	ps, err := policy.Parse([]byte(Policies))
	if err != nil {
		t.Fatal(err)
	}
	eng := policy.NewEngine(policy.Options{TrustDomain: td})
	if err := eng.Update(ps); err != nil {
		t.Fatal(err)
	}
	eng.SetWorkloads(snap)
	id := func(ns, sa string) spiffeid.ID {
		id, err := identity.WorkloadID(td, ns, sa)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	f := &Fixture{
		Addr: filepath.Join(t.TempDir(), "admin.sock"), Engine: eng, Flows: telemetry.NewFlowLog(64), Store: store,
		Certs: []identity.CertInfo{
			{ID: id("shop", "checkout"), Serial: "c0ffee", NotBefore: Now.Add(-time.Hour), NotAfter: Now.Add(23 * time.Hour),
				IssuedAt: Now.Add(-time.Hour), RenewAt: Now.Add(11 * time.Hour)},
			{ID: id("shop", "frontend"), Serial: "beef", NotBefore: Now.Add(-23 * time.Hour), NotAfter: Now.Add(30 * time.Minute),
				IssuedAt: Now.Add(-23 * time.Hour), RenewAt: Now.Add(-11 * time.Hour), Failures: 3, LastError: "ca: connection refused"},
		},
		Pods: []agent.PodStatus{
			{Pod: "shop/checkout-0", IP: CheckoutIP, Ifindex: 12, Strict: true},
			{Pod: "shop/frontend-0", IP: FrontendIP, Ifindex: 11},
		},
		Ready: true, Reason: "ready: 2 local pods enrolled, 0 pending, 2 veths attached",
		DP: &Datapath{St: bpf.Status{SkLookupAttached: true, Listeners: []bpf.Slot{bpf.Outbound, bpf.HBONE}, Pods: []int{11, 12}, Uplinks: []int{2}},
			N: bpf.Counters{Redirected: 40, SpoofDrops: 2, StrictDrops: 1}},
		Config: source.Status{Kind: "file", Where: "/etc/mantlet/cluster.yaml", Applied: 3, Rejected: 1,
			AppliedAt: Now.Add(-time.Hour), RejectedAt: Now.Add(-2 * time.Hour)},
	}
	f.Server, err = admin.NewServer(admin.Config{
		Node: "node-a", TrustDomain: td, Version: "v0.0.0-test",
		Snapshot:     store.Load,
		Ready:        func() (bool, string) { return f.Ready, f.Reason },
		Pods:         func() []agent.PodStatus { return f.Pods },
		Datapath:     f.DP,
		Source:       func() source.Status { return f.Config },
		Certificates: func() []identity.CertInfo { return f.Certs },
		Policy:       eng,
		Policies:     func() []*v1alpha1.MeshPolicy { return ps },
		Flows:        f.Flows,
		OpenFlows:    func() int { return 3 },
		Now:          func() time.Time { return Now },
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := admin.ListenUnix(f.Addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Server.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("admin server: %v", err)
		}
	})
	return f
}

// Denied is the flow of a denied connection frontend-0 → payments-0
// (an ALLOW policy selects payments, none of its rules admits frontend).
func Denied(id uint64) events.Flow {
	return events.Flow{
		Time: Now, Kind: events.KindFlow, Event: events.Close, ID: id, Direction: "inbound", Path: "hbone",
		Src:  events.Endpoint{Addr: netip.MustParseAddrPort("198.19.1.10:40000"), Workload: "frontend-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/frontend"},
		Dst:  events.Endpoint{Addr: netip.MustParseAddrPort("198.19.2.10:8443"), Workload: "payments-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/payments"},
		MTLS: true, ResponseFlag: "policy_denied", Verdict: events.Denied,
	}
}

// Allowed is the flow of an allowed connection checkout-0 → payments-0
// that carried bytes.
func Allowed(id uint64) events.Flow {
	return events.Flow{
		Time: Now, Kind: events.KindFlow, Event: events.Close, ID: id, Direction: "outbound", Path: "hbone",
		Src: events.Endpoint{Addr: netip.MustParseAddrPort("198.19.1.20:41000"), Workload: "checkout-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/checkout"},
		Dst: events.Endpoint{Addr: netip.MustParseAddrPort("198.19.2.10:8443"), Workload: "payments-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/payments",
			Service: "payments.shop.svc.cluster.local"},
		MTLS: true, BytesSent: 512, BytesReceived: 2048, DurationMS: 12.5, ResponseFlag: "-", Verdict: events.Allowed,
	}
}
