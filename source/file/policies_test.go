package file

import (
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

const clusterFile = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {mantlet.io/mesh: enabled, mantlet.io/mtls: STRICT}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, annotations: {mantlet.io/mesh: enabled, mantlet.io/mtls: STRICT}}
---
apiVersion: v1
kind: Namespace
metadata: {name: open, annotations: {mantlet.io/mesh: enabled}}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: web, name: web-permissive}
spec:
  selector: {matchLabels: {app: legacy-client-facing}}
  mtls: PERMISSIVE
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: mantlet-system, name: mesh-strict}
spec:
  mtls: STRICT
`

func TestClusterFilePoliciesAndMTLSPrecedence(t *testing.T) {
	m, err := Parse("cluster.yaml", []byte(clusterFile), Options{Kinds: PolicyKinds()})
	if err != nil {
		t.Fatal(err)
	}
	eng := policy.NewEngine(policy.Options{DefaultMTLS: v1alpha1.MTLSPermissive})
	if err := eng.Update(Policies(m)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		w      workload.Workload
		want   v1alpha1.MTLSMode
		reason string
	}{
		{"annotation STRICT", workload.Workload{UID: "1", Namespace: "shop"}, v1alpha1.MTLSStrict, ""},
		{"a selector policy beats the annotation", workload.Workload{UID: "2", Namespace: "web", Labels: map[string]string{"app": "legacy-client-facing"}}, v1alpha1.MTLSPermissive, ""},
		{"no annotation: the mesh-wide policy beats --mtls-mode", workload.Workload{UID: "3", Namespace: "open"}, v1alpha1.MTLSStrict, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := eng.MTLSMode(&tc.w); got != tc.want {
				t.Fatalf("mode %s, want %s", got, tc.want)
			}
		})
	}
}

func TestInvalidPolicyRejectsTheFile(t *testing.T) {
	bad := clusterFile + `---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: broken}
spec:
  action: ALLOW
  rules:
  - to: {ports: ["9100-9000"]}
`
	_, err := Parse("cluster.yaml", []byte(bad), Options{Kinds: PolicyKinds()})
	want := `cluster.yaml: document 6 (MeshPolicy shop/broken): spec.rules[0].to.ports[0]: "9100-9000" is an empty range (low > high); want a port 1-65535 or a range "low-high" such as "9000-9100"`
	if err == nil || err.Error() != want {
		t.Fatalf("error\n%v\nwant\n%s", err, want)
	}
	unknown := strings.Replace(clusterFile, "mtls: PERMISSIVE", "mTLS: PERMISSIVE", 1)
	_, err = Parse("cluster.yaml", []byte(unknown), Options{Kinds: PolicyKinds()})
	if err == nil || !strings.Contains(err.Error(), `document 4 (MeshPolicy web/web-permissive): unknown field "spec.mTLS"`) {
		t.Fatalf("error %v", err)
	}
}
