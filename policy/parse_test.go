package policy

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/workload"
)

func TestParseExampleFile(t *testing.T) {
	data, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ps, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range ps {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	if got, want := strings.Join(names, " "), "mantlet-system/mesh-defaults shop/payments-allow-checkout shop/payments-audit-outside-office shop/payments-rate-limit"; got != want {
		t.Fatalf("parsed %s, want %s", got, want)
	}
	e := NewEngine(Options{})
	if err := e.Update(ps); err != nil {
		t.Fatal(err)
	}
	snap, err := workload.New(nil, testWorkloads, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.SetWorkloads(snap)
	tests := []struct{ src, dst, want string }{
		{"shop/checkout@10.0.1.2", "payments:8443", "allowed-by-policy shop/payments-allow-checkout#0"},
		{"shop/checkout@10.66.1.2", "payments:8443", "allowed-by-policy shop/payments-allow-checkout#0 audit=shop/payments-audit-outside-office#0"},
		{"shop/checkout@10.0.1.2", "payments:22", "no-allow-matched"},
		{"web/frontend@10.0.2.1", "payments:8443", "no-allow-matched"},
		{"web/frontend@10.0.2.1", "checkout:8080", "denied-by-default-deny"},
		{"@10.0.2.1", "checkout:8080", "denied-plaintext-strict mantlet-system/mesh-defaults"},
	}
	for _, tt := range tests {
		if got := verdict(e.Decide(input(t, snap, tt.src, tt.dst))); got != tt.want {
			t.Errorf("%s -> %s: got %q, want %q", tt.src, tt.dst, got, tt.want)
		}
	}
	rl, ok := e.RateLimit(snap.WorkloadByIP(netip.MustParseAddr("10.0.1.1")))
	if !ok || rl != (RateLimit{ConnectionsPerSecond: 50, Burst: 100, MaxConnections: 1000, Policy: "shop/payments-rate-limit"}) {
		t.Errorf("payments rate limit = %+v %v", rl, ok)
	}
}

func TestParseErrors(t *testing.T) {
	const head = "apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: shop, name: p}\n"
	tests := []struct {
		name, doc, want string
	}{
		{"unknown field", head + "spec: {mtls: STRICT, mTLS: STRICT}\n",
			`policy: parse: document 1: invalid MeshPolicy: unknown field "spec.mTLS"`},
		{"wrong apiVersion", "apiVersion: mantlet.io/v1\nkind: MeshPolicy\nmetadata: {namespace: shop, name: p}\nspec: {mtls: STRICT}\n",
			`policy: parse: document 1: invalid MeshPolicy: apiVersion "mantlet.io/v1" kind "MeshPolicy": want apiVersion mantlet.io/v1alpha1, kind MeshPolicy`},
		{"invalid second document", "kind: Pod\n---\n" + head + "spec: {mtls: strict}\n",
			`policy: parse: document 2: MeshPolicy shop/p: spec.mtls: "strict" is not an mTLS mode; want STRICT or PERMISSIVE`},
		{"a port of the wrong type", head + "spec: {action: ALLOW, rules: [{to: {ports: [{a: 1}]}}]}\n",
			`policy: parse: document 1: invalid MeshPolicy: json: cannot unmarshal object into Go struct field Destination.spec.rules.to.ports of type int32`},
		{"duplicate field", head + "spec: {mtls: STRICT, mtls: PERMISSIVE}\n",
			"policy: parse: document 1: invalid MeshPolicy: yaml: unmarshal errors:\n  line 4: key \"mtls\" already set in map"},
		{"broken YAML", "kind: [\n",
			`policy: parse: document 1: invalid MeshPolicy: error converting YAML to JSON: yaml: line 1: did not find expected node content`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps, err := Parse([]byte(tt.doc))
			if err == nil || ps != nil {
				t.Fatalf("Parse = %v, %v; want an error and no policies", ps, err)
			}
			if err.Error() != tt.want {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Error("error does not wrap ErrInvalid")
			}
		})
	}
}
