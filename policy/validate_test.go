package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

func TestValidateErrors(t *testing.T) {
	tests := []struct {
		name string
		spec string // flow-style YAML of spec; the object is shop/p
		want string // the whole error, after "MeshPolicy shop/p: "
	}{
		{"unknown action", `{action: PERMIT, rules: [{}]}`,
			`spec.action: "PERMIT" is not an action; want ALLOW, DENY or AUDIT`},
		{"rules without action", `{rules: [{}]}`,
			`spec.action: required when spec.rules is set; want ALLOW, DENY or AUDIT`},
		{"empty spec", `{}`,
			`spec: sets nothing; want an action with rules, mtls, rateLimit or defaultDeny`},
		{"DENY without rules", `{action: DENY}`,
			`spec.rules: a DENY policy without rules matches nothing; add a rule (rules: [{}] matches every connection)`},
		{"unknown mtls mode", `{mtls: strict}`,
			`spec.mtls: "strict" is not an mTLS mode; want STRICT or PERMISSIVE`},
		{"bad selector operator", `{selector: {matchExpressions: [{key: app, operator: Near}]}, mtls: STRICT}`,
			`spec.selector.matchExpressions[0].operator: "Near" is not an operator; want In, NotIn, Exists or DoesNotExist`},
		{"every problem of a selector", `{selector: {matchLabels: {app: "bad value!", "-x": ok}, matchExpressions: [{key: tier, operator: Equals, values: [web]}, {key: "a b", operator: In}, {key: env, operator: Exists, values: [prod]}, {key: zone, operator: NotIn, values: [ok, "no good"]}]}, mtls: STRICT}`,
			`spec.selector.matchLabels["-x"]: "-x" is not a valid label key: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')` +
				`; spec.selector.matchLabels["app"]: "bad value!" is not a valid label value: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')` +
				`; spec.selector.matchExpressions[0].operator: "Equals" is not an operator; want In, NotIn, Exists or DoesNotExist` +
				`; spec.selector.matchExpressions[1].key: "a b" is not a valid label key: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')` +
				`; spec.selector.matchExpressions[1].values: empty; operator In needs at least one value` +
				`; spec.selector.matchExpressions[2].values: must be empty for operator Exists` +
				`; spec.selector.matchExpressions[3].values[1]: "no good" is not a valid label value: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')`},
		{"bad CIDR", `{action: ALLOW, rules: [{}, {from: [{ipBlocks: [{cidr: 10.0.0.1/33}]}]}]}`,
			`spec.rules[1].from[0].ipBlocks[0].cidr: "10.0.0.1/33" is not a CIDR; want an address and prefix length such as 10.0.0.0/8 or fd00::/8`},
		{"CIDR with host bits", `{action: ALLOW, rules: [{from: [{notIpBlocks: [{cidr: 10.1.2.3/8}]}]}]}`,
			`spec.rules[0].from[0].notIpBlocks[0].cidr: "10.1.2.3/8" has host bits set; want 10.0.0.0/8`},
		{"except outside the block", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16, 10.1.0.0/16]}]}]}]}`,
			`spec.rules[0].from[0].ipBlocks[0].except[0]: 11.0.0.0/16 is not inside cidr 10.0.0.0/8; want a sub-range of it`},
		{"bad principals", `{action: ALLOW, rules: [{from: [{principals: ["", "spiffe://td/a*b", "cluster.local/ns/x*", "spiffe://TD/x", "**"]}]}]}`,
			`spec.rules[0].from[0].principals[0]: empty; ` + wantPrincipal +
				`; spec.rules[0].from[0].principals[1]: "spiffe://td/a*b" has "*" in the middle; ` + wantPrincipal +
				`; spec.rules[0].from[0].principals[2]: "cluster.local/ns/x*": a prefix must start with spiffe://; ` + wantPrincipal +
				`; spec.rules[0].from[0].principals[3]: "spiffe://TD/x" is not a SPIFFE ID (trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores); ` + wantPrincipal +
				`; spec.rules[0].from[0].principals[4]: "**" has more than one "*"; ` + wantPrincipal},
		{"bad namespace and service accounts", `{action: DENY, rules: [{from: [{notNamespaces: [Shop], serviceAccounts: ["a/b/c", "/x"]}]}]}`,
			`spec.rules[0].from[0].notNamespaces[0]: "Shop" is not a valid namespace: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')` +
				`; spec.rules[0].from[0].serviceAccounts[0]: "a/b/c" is not a service account; want "name" (in the policy's namespace) or "namespace/name"` +
				`; spec.rules[0].from[0].serviceAccounts[1]: "/x" is not a service account; want "name" (in the policy's namespace) or "namespace/name"`},
		{"empty source and empty to", `{action: ALLOW, rules: [{from: [{}], to: {}}]}`,
			`spec.rules[0].from[0]: empty source; want at least one of principals, namespaces, serviceAccounts, ipBlocks or their not forms, or leave from out to match every source; spec.rules[0].to: empty; want ports or notPorts, or leave to out to match every port`},
		{"bad ports", `{action: ALLOW, rules: [{to: {ports: [0, 70000, "9100-9000", "http", "0-5"], notPorts: ["1-"]}}]}`,
			`spec.rules[0].to.ports[0]: 0 is out of range; ` + wantPort +
				`; spec.rules[0].to.ports[1]: 70000 is out of range; ` + wantPort +
				`; spec.rules[0].to.ports[2]: "9100-9000" is an empty range (low > high); ` + wantPort +
				`; spec.rules[0].to.ports[3]: "http" is not a port or range; ` + wantPort +
				`; spec.rules[0].to.ports[4]: "0-5" is out of range; ` + wantPort +
				`; spec.rules[0].to.notPorts[0]: "1-" is not a port or range; ` + wantPort},
		{"a port string longer than the CRD allows", `{action: ALLOW, rules: [{to: {ports: ["000000000080", "00080"]}}]}`,
			`spec.rules[0].to.ports[0]: "000000000080" is longer than 11 characters; ` + wantPort},
		{"too many rules", `{action: ALLOW, rules: [` + strings.Repeat(`{}, `, 32) + `{}]}`,
			`spec.rules: 33 entries; want at most 32`},
		{"lists longer than the CRD allows", `{action: ALLOW, rules: [{from: [` + strings.Repeat(`{namespaces: [a]}, `, 8) + `{ipBlocks: [` + strings.Repeat(`{cidr: 10.0.0.0/8}, `, 32) + `{cidr: 10.0.0.0/8, except: [` + strings.Repeat(`10.0.0.0/16, `, 8) + `10.0.0.0/16]}]}], to: {notPorts: [` + strings.Repeat(`1, `, 64) + `2]}}]}`,
			`spec.rules[0].from: 9 entries; want at most 8` +
				`; spec.rules[0].from[8].ipBlocks: 33 entries; want at most 32` +
				`; spec.rules[0].from[8].ipBlocks[32].except: 9 entries; want at most 8` +
				`; spec.rules[0].to.notPorts: 65 entries; want at most 64`},
		{"bad rate limit", `{rateLimit: {connectionsPerSecond: -1, burst: 5}}`,
			`spec.rateLimit.connectionsPerSecond: -1 is negative; want a positive number, or leave it out`},
		{"burst alone", `{rateLimit: {burst: 5}}`,
			`spec.rateLimit.burst: set without connectionsPerSecond; want both, or leave burst out`},
		{"empty rate limit", `{rateLimit: {}}`,
			`spec.rateLimit: sets nothing; want connectionsPerSecond (and burst) or maxConnections`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := fmt.Sprintf("apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: shop, name: p}\nspec: %s\n", tt.spec)
			_, err := ParseDocument([]byte(doc))
			if err == nil {
				t.Fatal("accepted")
			}
			if want := "MeshPolicy shop/p: " + tt.want; err.Error() != want {
				t.Errorf("error:\n got %s\nwant %s", err, want)
			}
			var ve *ValidationError
			if !errors.As(err, &ve) || !errors.Is(err, ErrInvalid) {
				t.Errorf("error %T is not a *ValidationError wrapping ErrInvalid", err)
			}
		})
	}
}

func TestUpdateReportsEveryInvalidPolicy(t *testing.T) {
	e := NewEngine(Options{})
	ok := pol(t, `shop/ok {mtls: STRICT}`)
	bad1 := pol(t, `shop/bad1 {mtls: STRICT}`)
	bad1.Spec.MTLS = "STRICTER"
	bad2 := pol(t, `web/bad2 {mtls: STRICT}`)
	bad2.Spec.Action = "ALLOW!"
	err := e.Update([]*v1alpha1.MeshPolicy{ok, bad1, bad2, ok.DeepCopy()})
	want := strings.Join([]string{
		`policy: set of 4 rejected, generation 0 stays in force: MeshPolicy shop/bad1: spec.mtls: "STRICTER" is not an mTLS mode; want STRICT or PERMISSIVE`,
		`MeshPolicy web/bad2: spec.action: "ALLOW!" is not an action; want ALLOW, DENY or AUDIT`,
		`MeshPolicy shop/ok: metadata.name: another MeshPolicy in the set has the same namespace and name; want unique names`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Errorf("error:\n got %v\nwant %s", err, want)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Error("error does not wrap ErrInvalid")
	}
}
