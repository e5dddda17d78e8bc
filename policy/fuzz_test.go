package policy

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// FuzzParse feeds arbitrary YAML/JSON streams to Parse. It must not panic;
// what it accepts must compile, and must survive a JSON round trip.
// Seeds: testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		ps, err := Parse(data)
		if err != nil {
			return
		}
		e := NewEngine(Options{})
		if err := e.Update(ps); err != nil {
			// Only duplicates may fail here: each policy was validated.
			seen := map[string]bool{}
			for _, p := range ps {
				seen[p.Namespace+"/"+p.Name] = true
			}
			if len(seen) == len(ps) {
				t.Fatalf("parsed policies do not compile: %v", err)
			}
		}
		for _, p := range ps {
			js, err := json.Marshal(p)
			if err != nil {
				t.Fatalf("marshal %s/%s: %v", p.Namespace, p.Name, err)
			}
			if _, err := ParseDocument(js); err != nil {
				t.Fatalf("%s/%s does not survive a round trip: %v\n%s", p.Namespace, p.Name, err, js)
			}
		}
	})
}

// FuzzDecide builds a policy set from the fuzz input and checks, for every
// combination of a fixed set of sources, destinations and ports, that the
// compiled engine agrees with the reference evaluation, and that the
// verdict does not change when policies or rules are reordered, or when
// the destination is not in the engine's index. Seeds:
// testdata/fuzz/FuzzDecide.
func FuzzDecide(f *testing.F) {
	snap, err := workload.New(nil, testWorkloads, nil)
	if err != nil {
		f.Fatal(err)
	}
	srcs := []string{"shop/checkout@10.0.1.2", "web/frontend@10.0.2.1", "@10.0.2.1", "@192.168.1.1", "id=spiffe://other.org/ns/web/sa/frontend@10.0.2.1", "web/checkout@10.0.2.9", "@fd00::1", "shop/payments@::ffff:10.0.1.1"}
	dsts := []string{"payments", "checkout", "frontend", "none"}
	ports := []string{"8443", "22", "8500", "9090"}
	var inputs []Input
	for _, s := range srcs {
		for _, d := range dsts {
			for _, p := range ports {
				inputs = append(inputs, input(f, snap, s, d+":"+p))
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		g := &gen{data: data}
		policies := g.policies()
		opts := Options{DefaultDeny: g.n(8) == 0}
		if g.n(8) == 0 {
			opts.DefaultMTLS = v1alpha1.MTLSStrict
		}
		engine := func(ps []*v1alpha1.MeshPolicy) *Engine {
			e := NewEngine(opts)
			e.SetWorkloads(snap)
			if err := e.Update(ps); err != nil {
				t.Fatalf("generated set rejected: %v", err)
			}
			return e
		}
		e := engine(policies)
		reordered := make([]*v1alpha1.MeshPolicy, len(policies))
		for i, p := range policies {
			q := p.DeepCopy()
			slices.Reverse(q.Spec.Rules)
			for r := range q.Spec.Rules {
				slices.Reverse(q.Spec.Rules[r].From)
			}
			reordered[len(policies)-1-i] = q
		}
		e2 := engine(reordered)
		for _, in := range inputs {
			d := e.Decide(in)
			if ref := referenceDecide(policies, opts, in); verdict(d) != verdict(ref) {
				t.Fatalf("%v %v -> %v:%d: engine %q, reference %q\npolicies: %s", in.SrcID, in.SrcIP, in.Dst, in.DstPort, verdict(d), verdict(ref), dump(policies))
			}
			if d2 := e2.Decide(in); stable(d2) != stable(d) {
				t.Fatalf("%v %v -> %v:%d: reordering changed %q to %q\npolicies: %s", in.SrcID, in.SrcIP, in.Dst, in.DstPort, stable(d), stable(d2), dump(policies))
			}
			if in.Dst != nil {
				stranger := *in.Dst
				stranger.UID = "not-indexed"
				in.Dst = &stranger
				if d3 := e.Decide(in); verdict(d3) != verdict(d) {
					t.Fatalf("unindexed destination: %q, indexed: %q", verdict(d3), verdict(d))
				}
			}
		}
	})
}

// stable is the part of a decision that must not depend on the order of
// policies and rules (the rule index may).
func stable(d Decision) string {
	s := fmt.Sprintf("%v %s %s %d", d.Allowed, d.Reason, d.Policy, d.AuditCount)
	for _, h := range d.AuditHits() {
		s += " " + h.Policy
	}
	return s
}

func dump(ps []*v1alpha1.MeshPolicy) string {
	js, _ := json.Marshal(ps)
	return string(js)
}

// gen turns fuzz bytes into choices; past the end every choice is 0.
type gen struct {
	data []byte
	i    int
}

func (g *gen) n(k int) int {
	if g.i >= len(g.data) {
		return 0
	}
	b := g.data[g.i]
	g.i++
	return int(b) % k
}

func (g *gen) pick(pool []string) []string {
	var out []string
	for range g.n(3) {
		out = append(out, pool[g.n(len(pool))])
	}
	return out
}

func (g *gen) policies() []*v1alpha1.MeshPolicy {
	var out []*v1alpha1.MeshPolicy
	for i := range 1 + g.n(6) {
		p := &v1alpha1.MeshPolicy{}
		p.Namespace = []string{"shop", "web", DefaultRootNamespace}[g.n(3)]
		p.Name = fmt.Sprintf("p%d", i)
		switch g.n(5) {
		case 1:
			p.Spec.Selector = &metav1.LabelSelector{MatchLabels: map[string]string{"app": "payments"}}
		case 2:
			p.Spec.Selector = &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "tier", Operator: metav1.LabelSelectorOpIn, Values: []string{"backend"}}}}
		case 3:
			p.Spec.Selector = &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"checkout"}}}}
		case 4:
			p.Spec.Selector = &metav1.LabelSelector{}
		}
		p.Spec.Action = []v1alpha1.Action{v1alpha1.ActionAllow, v1alpha1.ActionDeny, v1alpha1.ActionAudit, ""}[g.n(4)]
		p.Spec.MTLS = []v1alpha1.MTLSMode{"", "", v1alpha1.MTLSStrict, v1alpha1.MTLSPermissive}[g.n(4)]
		p.Spec.DefaultDeny = g.n(6) == 0
		if g.n(4) == 0 {
			p.Spec.RateLimit = &v1alpha1.RateLimit{ConnectionsPerSecond: int32(g.n(3)), MaxConnections: 1 + int32(g.n(3))}
		}
		if p.Spec.Action != "" {
			for range g.n(4) {
				p.Spec.Rules = append(p.Spec.Rules, g.rule())
			}
		}
		if Validate(p) == nil {
			out = append(out, p)
		}
	}
	return out
}

func (g *gen) rule() v1alpha1.Rule {
	var r v1alpha1.Rule
	for range g.n(3) {
		var s v1alpha1.Source
		principals := []string{"spiffe://cluster.local/ns/shop/sa/checkout", "spiffe://cluster.local/ns/web/sa/frontend", "*", "spiffe://cluster.local/ns/web/*", "*/sa/checkout", "spiffe://other.org/*"}
		namespaces := []string{"shop", "web", "other"}
		accounts := []string{"checkout", "payments", "web/frontend", "shop/checkout", "web/checkout"}
		blocks := []v1alpha1.IPBlock{{CIDR: "10.0.0.0/8", Except: []string{"10.0.2.0/24"}}, {CIDR: "10.0.1.0/24"}, {CIDR: "192.168.0.0/16"}, {CIDR: "fd00::/8"}}
		pickBlocks := func() []v1alpha1.IPBlock {
			var out []v1alpha1.IPBlock
			for range g.n(3) {
				out = append(out, blocks[g.n(len(blocks))])
			}
			return out
		}
		s.Principals, s.NotPrincipals = g.pick(principals), g.pick(principals)
		s.Namespaces, s.NotNamespaces = g.pick(namespaces), g.pick(namespaces)
		s.ServiceAccounts, s.NotServiceAccounts = g.pick(accounts), g.pick(accounts)
		s.IPBlocks, s.NotIPBlocks = pickBlocks(), pickBlocks()
		r.From = append(r.From, s)
	}
	if g.n(2) == 0 {
		ports := []intstr.IntOrString{intstr.FromInt32(8443), intstr.FromString("8000-9000"), intstr.FromInt32(22), intstr.FromString("1-65535")}
		r.To = &v1alpha1.Destination{}
		for range 1 + g.n(2) {
			r.To.Ports = append(r.To.Ports, ports[g.n(len(ports))])
		}
		for range g.n(2) {
			r.To.NotPorts = append(r.To.NotPorts, ports[g.n(len(ports))])
		}
	}
	return r
}
