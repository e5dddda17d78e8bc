package enforce

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/ztunnel"
)

// The benchmark cluster: 1,000 namespaces of 10 apps with 10 replicas
// (100,000 workloads, workload i at 10.0.0.0+i) and 10 policies per
// namespace of every kind the adapter handles (ALLOW, DENY, AUDIT, STRICT,
// rate and connection limits), so 10,000 policies; the 10-policy set is
// the first namespace's.

const (
	benchNamespaces = 1000
	benchApps       = 10
	benchReplicas   = 10
)

func benchNS(i int) string { return fmt.Sprintf("ns-%04d", i%benchNamespaces) }

func benchID(ns string, app int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/app-%d", ns, app%benchApps)
}

func benchPolicies(n int) []*v1alpha1.MeshPolicy {
	ns, next := benchNS(n), benchNS(n+1)
	sel := func(app int) *metav1.LabelSelector {
		return &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", app)}}
	}
	port := intstr.FromInt32
	mk := func(name string, spec v1alpha1.MeshPolicySpec) *v1alpha1.MeshPolicy {
		return &v1alpha1.MeshPolicy{
			TypeMeta:   metav1.TypeMeta{APIVersion: policy.APIVersion, Kind: v1alpha1.Kind},
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:       spec,
		}
	}
	rules := func(from v1alpha1.Source, to *v1alpha1.Destination) []v1alpha1.Rule {
		return []v1alpha1.Rule{{From: []v1alpha1.Source{from}, To: to}}
	}
	return []*v1alpha1.MeshPolicy{
		mk("app-0-allow", v1alpha1.MeshPolicySpec{Selector: sel(0), Action: v1alpha1.ActionAllow,
			Rules: rules(v1alpha1.Source{Principals: []string{benchID(ns, 1), benchID(ns, 2)}}, &v1alpha1.Destination{Ports: []intstr.IntOrString{port(8443)}})}),
		mk("app-1-deny-others", v1alpha1.MeshPolicySpec{Selector: sel(1), Action: v1alpha1.ActionDeny,
			Rules: rules(v1alpha1.Source{NotNamespaces: []string{ns}}, nil)}),
		mk("app-2-audit", v1alpha1.MeshPolicySpec{Selector: sel(2), Action: v1alpha1.ActionAudit,
			Rules: rules(v1alpha1.Source{NotIPBlocks: []v1alpha1.IPBlock{{CIDR: "10.0.0.0/8"}}}, nil)}),
		mk("app-3-allow-accounts", v1alpha1.MeshPolicySpec{Selector: sel(3), Action: v1alpha1.ActionAllow,
			Rules: rules(v1alpha1.Source{ServiceAccounts: []string{"app-4", next + "/app-5"}}, nil)}),
		mk("app-4-allow-namespaces", v1alpha1.MeshPolicySpec{Selector: sel(4), Action: v1alpha1.ActionAllow,
			Rules: rules(v1alpha1.Source{Namespaces: []string{ns, next}}, nil)}),
		mk("app-5-strict", v1alpha1.MeshPolicySpec{Selector: sel(5), MTLS: v1alpha1.MTLSStrict}),
		mk("app-6-limits", v1alpha1.MeshPolicySpec{Selector: sel(6), RateLimit: &v1alpha1.RateLimit{ConnectionsPerSecond: 1000, Burst: 2000, MaxConnections: 1000}}),
		mk("app-7-allow-wildcard", v1alpha1.MeshPolicySpec{Selector: sel(7), Action: v1alpha1.ActionAllow,
			Rules: rules(v1alpha1.Source{Principals: []string{"spiffe://cluster.local/ns/" + ns + "/*"}}, nil)}),
		mk("app-8-deny-ssh", v1alpha1.MeshPolicySpec{Selector: sel(8), Action: v1alpha1.ActionDeny,
			Rules: []v1alpha1.Rule{{To: &v1alpha1.Destination{Ports: []intstr.IntOrString{port(22)}}}}}),
		mk("app-9-limits", v1alpha1.MeshPolicySpec{Selector: sel(9), RateLimit: &v1alpha1.RateLimit{ConnectionsPerSecond: 1000, Burst: 2000}}),
	}
}

var benchSnapshot = sync.OnceValues(func() (*workload.Snapshot, error) {
	ws := make([]workload.Workload, 0, benchNamespaces*benchApps*benchReplicas)
	for n := range benchNamespaces {
		ns := benchNS(n)
		for a := range benchApps {
			labels := map[string]string{"app": fmt.Sprintf("app-%d", a)}
			for r := range benchReplicas {
				i := len(ws)
				ws = append(ws, workload.Workload{
					UID: fmt.Sprintf("%s-app-%d-%d", ns, a, r), Name: fmt.Sprintf("app-%d-%d", a, r), Namespace: ns,
					ServiceAccount: fmt.Sprintf("app-%d", a), Labels: labels, Node: fmt.Sprintf("node-%d", i%100),
					IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})}, Enrolled: true,
				})
			}
		}
	}
	return workload.New(nil, ws, nil)
})

// benchFlows returns 4096 mTLS flows: sources from anywhere, destinations
// in the first namespace (so that both policy sets judge the same
// connections), on a handful of ports.
func benchFlows(snap *workload.Snapshot) []ztunnel.Flow {
	ws := snap.Workloads()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	seed := uint64(7)
	next := func(n int) int {
		seed = seed*6364136223846793005 + 1442695040888963407
		return int((seed >> 33) % uint64(n))
	}
	ports := []uint16{8443, 8080, 22}
	out := make([]ztunnel.Flow, 4096)
	for i := range out {
		src := ws[next(len(ws))]
		if i%2 == 0 {
			src = ws[next(benchApps*benchReplicas)] // same namespace
		}
		dst := ws[next(benchApps*benchReplicas)]
		id, _ := src.ID(td)
		out[i] = ztunnel.Flow{Direction: ztunnel.Inbound, SrcID: id, SrcAddr: netip.AddrPortFrom(src.IPs[0], 40000), Src: src,
			Dst: dst, DstAddr: netip.AddrPortFrom(dst.IPs[0], ports[next(len(ports))]), MTLS: true}
	}
	return out
}

// BenchmarkAuthorize measures one Authorize (and the Release of an
// allowed flow): the engine's decision, the rate limiter and the
// connection count, with 10 and 10,000 policies over 100,000 workloads.
// The events rows add a real event writer (to io.Discard) for the
// refusals.
func BenchmarkAuthorize(b *testing.B) {
	snap, err := benchSnapshot()
	if err != nil {
		b.Fatal(err)
	}
	flows := benchFlows(snap)
	for _, bc := range []struct {
		name       string
		namespaces int
		events     bool
	}{
		{"policies=10", 1, false},
		{"policies=10000", benchNamespaces, false},
		{"policies=10000/events", benchNamespaces, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var ps []*v1alpha1.MeshPolicy
			for n := range bc.namespaces {
				ps = append(ps, benchPolicies(n)...)
			}
			eng := policy.NewEngine(policy.Options{})
			if err := eng.Update(ps); err != nil {
				b.Fatal(err)
			}
			eng.SetWorkloads(snap)
			opts := Options{}
			if bc.events {
				w := events.NewWriter(io.Discard, events.WriterOptions{Rate: 1e9})
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { w.Run(ctx); close(done) }()
				defer func() { cancel(); <-done }()
				opts.Events = w
			}
			az := New(eng, opts)
			ctx := context.Background()
			allowed := 0
			for i := range flows {
				if v := az.Authorize(ctx, &flows[i]); v.Allow {
					allowed++
					az.Release(&flows[i], v)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				f := &flows[i%len(flows)]
				if v := az.Authorize(ctx, f); v.Allow {
					az.Release(f, v)
				}
			}
			b.ReportMetric(float64(allowed)/float64(len(flows)), "allowed-share")
		})
	}
}

// TestAuthorizeDoesNotAllocateWithoutEvents: with no event sink, a
// decision, allowed or refused, costs no allocation once the source's
// rate-limit bucket exists.
func TestAuthorizeDoesNotAllocateWithoutEvents(t *testing.T) {
	if testing.Short() {
		t.Skip("builds 100,000 workloads")
	}
	snap, err := benchSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	eng := policy.NewEngine(policy.Options{})
	if err := eng.Update(benchPolicies(0)); err != nil {
		t.Fatal(err)
	}
	eng.SetWorkloads(snap)
	az := New(eng, Options{})
	flows := benchFlows(snap)
	ctx := context.Background()
	for i := range flows {
		if v := az.Authorize(ctx, &flows[i]); v.Allow {
			az.Release(&flows[i], v)
		}
	}
	i := 0
	if n := testing.AllocsPerRun(4096, func() {
		f := &flows[i%len(flows)]
		i++
		if v := az.Authorize(ctx, f); v.Allow {
			az.Release(f, v)
		}
	}); n != 0 {
		t.Fatalf("%v allocations per decision", n)
	}
}
