package file

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// FuzzParse feeds arbitrary files to the parser: it must never panic, a
// success must be a usable snapshot, and a failure must be a list of
// problems that each name the file.
func FuzzParse(f *testing.F) {
	seed, err := os.ReadFile("testdata/cluster.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte(base + `{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}]}`))
	// The paths of errors: no object, misspelt kinds, a core kind of
	// another group, YAML errors after several documents, a field missing
	// next to its misspelling.
	f.Add([]byte(""))
	f.Add([]byte("# nothing yet\n---\n\n---\n"))
	f.Add([]byte(base + `{apiVersion: apps/v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`))
	f.Add([]byte(base + `{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: pods, metadata: {name: a}}, {apiVersion: v1, kind: ConfigMap}]}`))
	f.Add([]byte(base + "apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicies\nmetadata: {name: p, namespace: shop}\nspec: {action: DENY}\n"))
	f.Add([]byte(base + "apiVersion: v1\nkind: MeshPolicy\n---\napiVersion: mantlet.io/v1\nkind: Service\n"))
	f.Add([]byte(base + "# a comment\n---\nkind: Pod\n  name: [a\n"))
	f.Add([]byte(base + `{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIp: 198.19.1.1}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Parse("f.yaml", data, policyKinds)
		if err != nil {
			var list ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("error %v (%T) is not a non-empty ErrorList", err, err)
			}
			for _, e := range list {
				if !strings.HasPrefix(e.Error(), "f.yaml") {
					t.Fatalf("problem %q does not name the file", e)
				}
			}
			return
		}
		if m.Snapshot == nil {
			t.Fatal("success without a snapshot")
		}
		for _, w := range m.Snapshot.Workloads() {
			if len(w.IPs) == 0 || w.Node == "" || !w.NodeIP.IsValid() || w.ServiceAccount == "" {
				t.Fatalf("workload %s is incomplete: %+v", w, w)
			}
			if _, err := w.ID(td); err != nil {
				t.Fatalf("workload %s has no valid SPIFFE ID: %v", w, err)
			}
		}
	})
}
