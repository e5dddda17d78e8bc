package policy

import (
	"bytes"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// The benchmark corpus is generated here, deterministically: 1,000
// namespaces of 10 apps with 10 replicas each (100,000 workloads) and 10
// policies per namespace (10,000 policies) of every kind. As YAML it would
// be about 5 MB, so it is not committed; testdata/bench-sample.yaml holds
// the policies of the first two namespaces, and TestBenchCorpusSample
// checks that the generator still produces it (go test -run
// TestBenchCorpusSample -update rewrites it).

var update = flag.Bool("update", false, "rewrite testdata/bench-sample.yaml")

const (
	corpusNamespaces = 1000
	corpusApps       = 10
	corpusReplicas   = 10
)

func corpusNS(i int) string { return fmt.Sprintf("ns-%04d", i%corpusNamespaces) }

func corpusID(ns string, app int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/app-%d", ns, app%corpusApps)
}

// corpusWorkloads returns the 100,000 workloads: the i-th has IP 10.0.0.0
// + i and runs on node i%100. Workloads are sorted by namespace and name in
// the snapshot, so namespace n's are at [n*100, n*100+100).
func corpusWorkloads() []workload.Workload {
	out := make([]workload.Workload, 0, corpusNamespaces*corpusApps*corpusReplicas)
	for n := range corpusNamespaces {
		ns := corpusNS(n)
		for a := range corpusApps {
			labels := map[string]string{"app": fmt.Sprintf("app-%d", a), "tier": []string{"web", "api", "db"}[a%3]}
			for r := range corpusReplicas {
				i := len(out)
				out = append(out, workload.Workload{
					UID:            fmt.Sprintf("%s-app-%d-%d", ns, a, r),
					Name:           fmt.Sprintf("app-%d-%d", a, r),
					Namespace:      ns,
					ServiceAccount: fmt.Sprintf("app-%d", a),
					Labels:         labels,
					Node:           fmt.Sprintf("node-%d", i%100),
					IPs:            []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})},
					Enrolled:       true,
				})
			}
		}
	}
	return out
}

// corpusPolicies returns the 10 policies of namespace n.
func corpusPolicies(n int) []*v1alpha1.MeshPolicy {
	ns, next := corpusNS(n), corpusNS(n+1)
	sel := func(app int) *metav1.LabelSelector {
		return &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", app)}}
	}
	port := intstr.FromInt32
	mk := func(name string, spec v1alpha1.MeshPolicySpec) *v1alpha1.MeshPolicy {
		return &v1alpha1.MeshPolicy{
			TypeMeta:   metav1.TypeMeta{APIVersion: APIVersion, Kind: v1alpha1.Kind},
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:       spec,
		}
	}
	many := make([]v1alpha1.Rule, 10)
	for i := range many {
		many[i] = v1alpha1.Rule{From: []v1alpha1.Source{{Principals: []string{corpusID(corpusNS(n+i+2), i)}}}, To: &v1alpha1.Destination{Ports: []intstr.IntOrString{port(int32(8000 + i))}}}
	}
	return []*v1alpha1.MeshPolicy{
		mk("app-0-allow-principals", v1alpha1.MeshPolicySpec{Selector: sel(0), Action: v1alpha1.ActionAllow, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{Principals: []string{corpusID(ns, 1), corpusID(ns, 2)}}}, To: &v1alpha1.Destination{Ports: []intstr.IntOrString{port(8443)}}}}}),
		mk("app-1-deny-other-namespaces", v1alpha1.MeshPolicySpec{Selector: sel(1), Action: v1alpha1.ActionDeny, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{NotNamespaces: []string{ns}}}}}}),
		mk("app-2-audit-outside", v1alpha1.MeshPolicySpec{Selector: sel(2), Action: v1alpha1.ActionAudit, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{NotIPBlocks: []v1alpha1.IPBlock{{CIDR: "10.0.0.0/8", Except: []string{"10.255.0.0/16"}}}}}}}}),
		mk("app-3-allow-accounts", v1alpha1.MeshPolicySpec{Selector: sel(3), Action: v1alpha1.ActionAllow, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{ServiceAccounts: []string{"app-4", next + "/app-5"}}}, To: &v1alpha1.Destination{Ports: []intstr.IntOrString{intstr.FromString("8000-9000")}}}}}),
		mk("app-4-allow-namespaces", v1alpha1.MeshPolicySpec{Selector: sel(4), Action: v1alpha1.ActionAllow, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{Namespaces: []string{ns, next}}}}}}),
		mk("namespace-strict", v1alpha1.MeshPolicySpec{MTLS: v1alpha1.MTLSStrict}),
		mk("app-6-rate-limit", v1alpha1.MeshPolicySpec{Selector: sel(6), RateLimit: &v1alpha1.RateLimit{ConnectionsPerSecond: 100, Burst: 200, MaxConnections: 1000}}),
		mk("app-7-allow-namespace-wildcard", v1alpha1.MeshPolicySpec{Selector: sel(7), Action: v1alpha1.ActionAllow, Rules: []v1alpha1.Rule{
			{From: []v1alpha1.Source{{Principals: []string{"spiffe://cluster.local/ns/" + ns + "/*"}}}}}}),
		mk("tier-db-deny-ssh", v1alpha1.MeshPolicySpec{Selector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "tier", Operator: metav1.LabelSelectorOpIn, Values: []string{"db"}}}},
			Action: v1alpha1.ActionDeny, Rules: []v1alpha1.Rule{{To: &v1alpha1.Destination{Ports: []intstr.IntOrString{port(22)}}}}}),
		mk("app-9-allow-many", v1alpha1.MeshPolicySpec{Selector: sel(9), Action: v1alpha1.ActionAllow, Rules: many}),
	}
}

func corpusPolicySet(namespaces int) []*v1alpha1.MeshPolicy {
	var out []*v1alpha1.MeshPolicy
	for n := range namespaces {
		out = append(out, corpusPolicies(n)...)
	}
	return out
}

var corpus = sync.OnceValues(func() (*workload.Snapshot, error) {
	return workload.New(nil, corpusWorkloads(), nil)
})

// corpusInputs returns 4096 connections between random corpus workloads,
// mostly mTLS, on a handful of ports. With toFirst, every destination is
// in the first namespace and every source in the first two.
func corpusInputs(snap *workload.Snapshot, toFirst bool) []Input {
	ws := snap.Workloads()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	seed := uint64(1)
	next := func(n int) int {
		seed = seed*6364136223846793005 + 1442695040888963407
		return int((seed >> 33) % uint64(n))
	}
	ports := []uint16{8443, 8005, 22, 80, 8500}
	out := make([]Input, 4096)
	for i := range out {
		src := ws[next(len(ws))]
		// Half the destinations are in the source's namespace or the next.
		dst := ws[next(len(ws))]
		if i%2 == 0 {
			var n int
			fmt.Sscanf(src.Namespace, "ns-%d", &n)
			n = (n + next(2)) % corpusNamespaces
			dst = ws[n*corpusApps*corpusReplicas+next(corpusApps*corpusReplicas)]
		}
		if toFirst {
			src = ws[next(2*corpusApps*corpusReplicas)]
			dst = ws[next(corpusApps*corpusReplicas)]
		}
		in := Input{SrcIP: src.IPs[0], Dst: dst, DstPort: ports[next(len(ports))], MTLS: next(8) != 0}
		if in.MTLS {
			in.SrcID, _ = src.ID(td)
		}
		out[i] = in
	}
	return out
}

func benchDecide(b *testing.B, namespaces int, toFirst bool) {
	snap, err := corpus()
	if err != nil {
		b.Fatal(err)
	}
	e := NewEngine(Options{})
	e.SetWorkloads(snap)
	if err := e.Update(corpusPolicySet(namespaces)); err != nil {
		b.Fatal(err)
	}
	inputs := corpusInputs(snap, toFirst)
	allowed := 0
	i := 0
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if e.Decide(inputs[i&(len(inputs)-1)]).Allowed {
			allowed++
		}
		i++
	}
	b.ReportMetric(float64(allowed)/float64(i), "allowed/op")
}

// BenchmarkDecide10Policies100kWorkloads: one namespace's 10 policies,
// connections between random workloads (most destinations have no
// policy).
func BenchmarkDecide10Policies100kWorkloads(b *testing.B) { benchDecide(b, 1, false) }

// BenchmarkDecide10kPolicies100kWorkloads: 10,000 policies, connections
// between random workloads (every destination has policies).
func BenchmarkDecide10kPolicies100kWorkloads(b *testing.B) { benchDecide(b, corpusNamespaces, false) }

// The same connections, all to the first namespace, whose workloads have
// the same policies in both sets: the cost per decision must not depend on
// how many other policies exist.
func BenchmarkDecideFirstNamespace10Policies(b *testing.B)  { benchDecide(b, 1, true) }
func BenchmarkDecideFirstNamespace10kPolicies(b *testing.B) { benchDecide(b, corpusNamespaces, true) }

// BenchmarkCompile10kPolicies100kWorkloads measures what a change costs
// over the full corpus: a new policy set (Update), a new workload snapshot
// (SetWorkloads), and building both from nothing with the heap the
// compiled state keeps.
func BenchmarkCompile10kPolicies100kWorkloads(b *testing.B) {
	snap, err := corpus()
	if err != nil {
		b.Fatal(err)
	}
	ps := corpusPolicySet(corpusNamespaces)
	b.Run("update", func(b *testing.B) {
		e := NewEngine(Options{})
		e.SetWorkloads(snap)
		b.ReportAllocs()
		for b.Loop() {
			if err := e.Update(ps); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("set-workloads", func(b *testing.B) {
		e := NewEngine(Options{})
		if err := e.Update(ps); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			e.SetWorkloads(snap)
		}
	})
	b.Run("from-scratch", func(b *testing.B) {
		var retained uint64
		b.ReportAllocs()
		for b.Loop() {
			var before, after runtime.MemStats
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&before)
			b.StartTimer()
			e := NewEngine(Options{})
			if err := e.Update(ps); err != nil {
				b.Fatal(err)
			}
			e.SetWorkloads(snap)
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&after)
			retained = after.HeapAlloc - before.HeapAlloc
			runtime.KeepAlive(e)
			b.StartTimer()
		}
		b.ReportMetric(float64(retained)/(1<<20), "MB-retained")
	})
}

// TestBenchCorpus checks the corpus is what the benchmarks claim, that
// decisions over it do not allocate, and that the engine agrees with the
// reference evaluation on a sample; it keeps the set-up cost visible.
func TestBenchCorpus(t *testing.T) {
	if testing.Short() {
		t.Skip("builds 100,000 workloads and 10,000 policies")
	}
	start := time.Now()
	snap, err := corpus()
	if err != nil {
		t.Fatal(err)
	}
	ps := corpusPolicySet(corpusNamespaces)
	e := NewEngine(Options{})
	e.SetWorkloads(snap)
	if err := e.Update(ps); err != nil {
		t.Fatal(err)
	}
	t.Logf("corpus of %d workloads and %d policies built and compiled in %v", len(snap.Workloads()), len(ps), time.Since(start).Round(time.Millisecond))
	if len(snap.Workloads()) != 100_000 || len(ps) != 10_000 {
		t.Fatalf("corpus has %d workloads and %d policies", len(snap.Workloads()), len(ps))
	}
	inputs := append(corpusInputs(snap, false), corpusInputs(snap, true)...)
	reasons := map[Reason]int{}
	for i, in := range inputs {
		d := e.Decide(in)
		reasons[d.Reason]++
		if i%64 == 0 {
			// The reference scans all 10,000 policies: sample it.
			if ref := referenceDecide(ps, Options{}, in); verdict(ref) != verdict(d) {
				t.Fatalf("%v -> %s:%d: engine %q, reference %q", in.SrcID, in.Dst, in.DstPort, verdict(d), verdict(ref))
			}
		}
	}
	t.Logf("verdicts over %d inputs: %v", len(inputs), reasons)
	for _, r := range []Reason{ReasonAllowedByDefault, ReasonAllowedByPolicy, ReasonDeniedByPolicy, ReasonNoAllowMatched, ReasonPlaintextStrict} {
		if reasons[r] == 0 {
			t.Errorf("no input was decided %s; the benchmark does not exercise it", r)
		}
	}
	if n := testing.AllocsPerRun(1000, func() {
		for _, in := range inputs[:64] {
			e.Decide(in)
		}
	}); n != 0 {
		t.Errorf("Decide allocates %v times per 64 decisions", n)
	}
}

func TestBenchCorpusSample(t *testing.T) {
	var buf bytes.Buffer
	buf.WriteString("# Generated by TestBenchCorpusSample (go test -run TestBenchCorpusSample -update):\n# the policies of the first 2 of the 1,000 benchmark namespaces.\n")
	for _, p := range corpusPolicySet(2) {
		js, err := yaml.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		buf.WriteString("---\n")
		buf.Write(js)
	}
	const path = "testdata/bench-sample.yaml"
	if *update {
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("the generator no longer produces %s; run with -update if that is intended", path)
	}
	ps, err := Parse(want)
	if err != nil || len(ps) != 20 {
		t.Fatalf("Parse(%s) = %d policies, %v", path, len(ps), err)
	}
}
