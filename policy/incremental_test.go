package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// TestApplyAfterChangesDecidesAsAFreshEngine: an engine given state after
// state, as a source gives them (unchanged policies and workloads are the
// same objects, changed ones are new), reuses what did not change, and
// decides every connection as an engine given only the last state does.
func TestApplyAfterChangesDecidesAsAFreshEngine(t *testing.T) {
	namespaces := []string{"shop", "web", DefaultRootNamespace}
	bodies := []string{
		`{action: DENY, selector: {matchLabels: {app: a}}, rules: [{to: {ports: ["80"]}}]}`,
		`{action: ALLOW, selector: {matchLabels: {app: b}}, rules: [{from: [{namespaces: [web]}]}]}`,
		`{action: ALLOW, rules: [{from: [{serviceAccounts: [sa-1]}], to: {ports: ["81"]}}]}`,
		`{action: DENY, rules: [{from: [{namespaces: [shop]}], to: {ports: ["82"]}}]}`,
		`{mtls: STRICT}`,
		`{mtls: PERMISSIVE, selector: {matchLabels: {app: a}}}`,
		`{defaultDeny: true}`,
		`{action: AUDIT, selector: {matchLabels: {app: c}}, rules: [{to: {ports: ["80"]}}]}`,
	}
	for seed := range uint64(10) {
		r := rand.New(rand.NewPCG(seed, 2))
		policies := map[string]*v1alpha1.MeshPolicy{} // ns/name
		workloads := map[string]*workload.Workload{}  // by UID
		change := func() {
			ns := namespaces[r.IntN(len(namespaces))]
			switch r.IntN(3) {
			case 0:
				name := fmt.Sprint("p", r.IntN(4))
				if r.IntN(4) == 0 {
					delete(policies, ns+"/"+name)
				} else {
					policies[ns+"/"+name] = pol(t, ns+"/"+name+" "+bodies[r.IntN(len(bodies))])
				}
			default:
				uid := fmt.Sprint("w", r.IntN(12))
				if r.IntN(5) == 0 {
					delete(workloads, uid)
					return
				}
				n := r.IntN(12)
				workloads[uid] = &workload.Workload{UID: uid, Name: uid, Namespace: namespaces[r.IntN(2)], ServiceAccount: fmt.Sprint("sa-", r.IntN(2)),
					Labels: map[string]string{"app": string(rune('a' + r.IntN(3)))}, Enrolled: true,
					IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, byte(10 + n)})}}
				for _, w := range workloads { // one address per workload
					if w.UID != uid && w.IPs[0] == workloads[uid].IPs[0] {
						delete(workloads, w.UID)
					}
				}
			}
		}
		state := func() (*workload.Snapshot, []*v1alpha1.MeshPolicy) {
			var ws []*workload.Workload
			for _, w := range workloads {
				ws = append(ws, w)
			}
			snap, err := workload.NewShared(nil, ws, nil)
			if err != nil {
				t.Fatal(err)
			}
			var ps []*v1alpha1.MeshPolicy
			for _, p := range policies {
				ps = append(ps, p)
			}
			return snap, ps
		}
		inc := NewEngine(Options{})
		for step := range 150 {
			change()
			snap, ps := state()
			if err := inc.Apply(snap, ps); err != nil {
				t.Fatal(err)
			}
			fresh := NewEngine(Options{})
			if err := fresh.Apply(snap, ps); err != nil {
				t.Fatal(err)
			}
			for _, dst := range snap.Workloads() {
				if got, want := inc.MTLSMode(dst), fresh.MTLSMode(dst); got != want {
					t.Fatalf("seed %d step %d: mode of %s %s, want %s", seed, step, dst, got, want)
				}
				for _, src := range []struct{ ns, sa string }{{"shop", "sa-0"}, {"web", "sa-1"}, {"", ""}} {
					for port := uint16(80); port <= 82; port++ {
						in := Input{Dst: dst, DstPort: port, SrcIP: netip.MustParseAddr("10.0.9.9")}
						if src.ns != "" {
							in.MTLS = true
							in.SrcID = spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("cluster.local"), "/ns/"+src.ns+"/sa/"+src.sa)
						}
						if got, want := inc.Decide(in), fresh.Decide(in); got != want {
							t.Fatalf("seed %d step %d: %s/%s to %s:%d: %+v, want %+v", seed, step, src.ns, src.sa, dst, port, got, want)
						}
					}
				}
			}
		}
	}
}
