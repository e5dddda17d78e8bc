package file

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var spiffeidA = spiffeid.RequireTrustDomainFromString("a.test")

// TestParseReadsTrustDomainAnnotations checks mantlet.io/trust-domain: a
// Node's gives its pods their trust domain, a Pod's overrides it, and
// pods of unannotated nodes keep the reader's (zero).
func TestParseReadsTrustDomainAnnotations(t *testing.T) {
	const cluster = `{apiVersion: v1, kind: Node, metadata: {name: node-1}, status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}}
---
{apiVersion: v1, kind: Node, metadata: {name: node-2, annotations: {mantlet.io/trust-domain: b.test}}, status: {addresses: [{type: InternalIP, address: 198.18.0.2}]}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: shop, annotations: {mantlet.io/mesh: enabled}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: local, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: inherits, namespace: shop}, spec: {nodeName: node-2}, status: {podIP: 198.19.2.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: own, namespace: shop, annotations: {mantlet.io/trust-domain: c.test}}, spec: {nodeName: node-2, serviceAccountName: api}, status: {podIP: 198.19.2.2}}
`
	m, err := Parse("f.yaml", []byte(cluster), Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, w := range m.Snapshot.Workloads() {
		id, err := w.ID(spiffeidA)
		if err != nil {
			t.Fatal(err)
		}
		got[w.Name] = id.String()
	}
	want := map[string]string{
		"local":    "spiffe://a.test/ns/shop/sa/default",
		"inherits": "spiffe://b.test/ns/shop/sa/default",
		"own":      "spiffe://c.test/ns/shop/sa/api",
	}
	for name, id := range want {
		if got[name] != id {
			t.Errorf("%s: ID %s, want %s", name, got[name], id)
		}
	}
	for _, n := range m.Snapshot.Nodes() {
		if want := map[string]string{"node-1": "", "node-2": "b.test"}[n.Name]; n.TrustDomain.Name() != want {
			t.Errorf("node %s: trust domain %q, want %q", n.Name, n.TrustDomain.Name(), want)
		}
	}
}

func TestParseRejectsBadTrustDomainAnnotations(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"on a pod",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, annotations: {mantlet.io/trust-domain: B.test}}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): metadata.annotations["mantlet.io/trust-domain"] "B.test": want a trust domain name such as b.example (lower-case letters, digits, '.', '-', '_')`},
		{"a SPIFFE ID instead of a name",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, annotations: {mantlet.io/trust-domain: "spiffe://b.test"}}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): metadata.annotations["mantlet.io/trust-domain"] "spiffe://b.test": want a trust domain name such as b.example (lower-case letters, digits, '.', '-', '_')`},
		{"on a node",
			`{apiVersion: v1, kind: Node, metadata: {name: node-2, annotations: {mantlet.io/trust-domain: "b test"}}, status: {addresses: [{type: InternalIP, address: 198.18.0.2}]}}`,
			`f.yaml: document 3 (Node node-2): metadata.annotations["mantlet.io/trust-domain"] "b test": want a trust domain name such as b.example (lower-case letters, digits, '.', '-', '_')`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(base+tc.yaml), Options{})
			if err == nil || err.Error() != tc.want {
				t.Fatalf("error:\n got %v\nwant %s", err, tc.want)
			}
		})
	}
}
