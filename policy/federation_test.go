package policy

import (
	"fmt"
	"strings"
	"testing"
)

// TestDecideFederatedPrincipals checks policies naming principals of a
// federated trust domain (b.test) for the engine of a node of
// cluster.local: principals match the authenticated ID exactly, trust
// domain included; namespace and service-account selectors are the local
// domain's and never match a foreign ID, even one with the same path.
func TestDecideFederatedPrincipals(t *testing.T) {
	const (
		foreign = "id=spiffe://b.test/ns/web/sa/frontend@10.0.9.1"
		local   = "web/frontend@10.0.2.1" // the same ns/sa in cluster.local
		allowB  = `shop/allow-b {action: ALLOW, rules: [{from: [{principals: ["spiffe://b.test/ns/web/sa/frontend"]}]}]}`
		denyB   = `shop/deny-b {action: DENY, rules: [{from: [{principals: ["spiffe://b.test/ns/web/sa/frontend"]}]}]}`
		allowL  = `shop/allow-l {action: ALLOW, rules: [{from: [{principals: ["spiffe://cluster.local/ns/web/sa/frontend"]}]}]}`
	)
	tests := []struct {
		name     string
		policies []string
		src      string
		want     string
	}{
		{"a foreign principal admits that ID", []string{allowB}, foreign, "allowed-by-policy shop/allow-b#0"},
		{"a foreign principal does not admit the local ID of the same path", []string{allowB}, local, "no-allow-matched"},
		{"a local principal does not admit the foreign ID of the same path", []string{allowL}, foreign, "no-allow-matched"},
		{"a foreign principal denies that ID", []string{denyB}, foreign, "denied-by-policy shop/deny-b#0"},
		{"a foreign principal's DENY spares the local ID", []string{denyB}, local, "allowed-by-default"},
		{"a foreign domain's prefix admits its IDs", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["spiffe://b.test/*"]}]}]}`}, foreign, "allowed-by-policy shop/a#0"},
		{"a foreign domain's prefix does not admit local IDs", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["spiffe://b.test/*"]}]}]}`}, local, "no-allow-matched"},
		{"namespaces never match a foreign ID", []string{`shop/a {action: ALLOW, rules: [{from: [{namespaces: [web]}]}]}`}, foreign, "no-allow-matched"},
		{"serviceAccounts never match a foreign ID", []string{`shop/a {action: ALLOW, rules: [{from: [{serviceAccounts: [web/frontend]}]}]}`}, foreign, "no-allow-matched"},
		{"a foreign ID is in no local namespace: notNamespaces holds", []string{`shop/a {action: DENY, rules: [{from: [{notNamespaces: [web, shop]}]}]}`}, foreign, "denied-by-policy shop/a#0"},
		{"namespaces and a foreign principal in one rule's sources are ORed", []string{`shop/a {action: ALLOW, rules: [{from: [{namespaces: [shop]}, {principals: ["spiffe://b.test/ns/web/sa/frontend"]}]}]}`}, foreign, "allowed-by-policy shop/a#0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, snap := testEngine(t, Options{}, tt.policies...)
			in := input(t, snap, tt.src, "payments:8443")
			d := e.Decide(in)
			if got := verdict(d); got != tt.want {
				t.Errorf("Decide(%s) = %q, want %q", tt.src, got, tt.want)
			}
			if want := reference(t, tt.policies, Options{}, in); verdict(want) != verdict(d) {
				t.Errorf("reference evaluation says %q", verdict(want))
			}
		})
	}
}

// TestFederatedPrincipalsAreValidated checks that a principal of another
// trust domain is checked as a SPIFFE ID when the policy is parsed.
func TestFederatedPrincipalsAreValidated(t *testing.T) {
	for _, tc := range []struct {
		principal string
		ok        bool
	}{
		{"spiffe://b.test/ns/web/sa/frontend", true},
		{"spiffe://b.example.org/ns/web/sa/frontend", true},
		{"spiffe://B.test/ns/web/sa/frontend", false},
		{"spiffe://b.test/ns/web/sa/frontend/", false},
		{"spiffe://b test/ns/web", false},
		{"spiffe:///ns/web/sa/frontend", false},
	} {
		t.Run(tc.principal, func(t *testing.T) {
			doc := fmt.Sprintf("apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: shop, name: p}\nspec: {action: ALLOW, rules: [{from: [{principals: [%q]}]}]}\n", tc.principal)
			_, err := ParseDocument([]byte(doc))
			if tc.ok != (err == nil) {
				t.Fatalf("ParseDocument: %v; want ok=%v", err, tc.ok)
			}
			if err != nil && !strings.Contains(err.Error(), "spec.rules[0].from[0].principals[0]: ") {
				t.Fatalf("error does not name the field: %v", err)
			}
		})
	}
}
