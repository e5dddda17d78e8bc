package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// The cluster of the decision tests: three workloads in two namespaces.
var testWorkloads = []workload.Workload{
	{UID: "pay", Name: "payments", Namespace: "shop", ServiceAccount: "payments", Labels: map[string]string{"app": "payments", "tier": "backend"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.1.1")}, Enrolled: true},
	{UID: "co", Name: "checkout", Namespace: "shop", ServiceAccount: "checkout", Labels: map[string]string{"app": "checkout", "tier": "frontend"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.1.2")}, Enrolled: true},
	{UID: "fe", Name: "frontend", Namespace: "web", ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.2.1")}, Enrolled: true},
}

// pol turns a flow-style YAML body "ns/name {spec...}" into a MeshPolicy.
func pol(t testing.TB, s string) *v1alpha1.MeshPolicy {
	t.Helper()
	key, spec, _ := strings.Cut(s, " ")
	ns, name, _ := strings.Cut(key, "/")
	doc := fmt.Sprintf("apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: %s, name: %s}\nspec: %s\n", ns, name, spec)
	p, err := ParseDocument([]byte(doc))
	if err != nil {
		t.Fatalf("policy %q: %v", s, err)
	}
	return p
}

func testEngine(t testing.TB, opts Options, policies ...string) (*Engine, *workload.Snapshot) {
	t.Helper()
	snap, err := workload.New(nil, testWorkloads, nil)
	if err != nil {
		t.Fatal(err)
	}
	e := NewEngine(opts)
	e.SetWorkloads(snap)
	var ps []*v1alpha1.MeshPolicy
	for _, s := range policies {
		ps = append(ps, pol(t, s))
	}
	if err := e.Update(ps); err != nil {
		t.Fatal(err)
	}
	return e, snap
}

// input parses "ns/sa@ip" (mTLS, identity in cluster.local), "id=<spiffe
// id>@ip" (mTLS, any ID) or "@ip" (plaintext), and "workload:port".
func input(t testing.TB, snap *workload.Snapshot, src, dst string) Input {
	t.Helper()
	var in Input
	who, ip, _ := strings.Cut(src, "@")
	in.SrcIP = netip.MustParseAddr(ip)
	switch {
	case strings.HasPrefix(who, "id="):
		in.SrcID, in.MTLS = spiffeid.RequireFromString(strings.TrimPrefix(who, "id=")), true
	case who != "":
		ns, sa, _ := strings.Cut(who, "/")
		in.SrcID, in.MTLS = spiffeid.RequireFromSegments(spiffeid.RequireTrustDomainFromString("cluster.local"), "ns", ns, "sa", sa), true
	}
	name, port, _ := strings.Cut(dst, ":")
	for _, w := range snap.Workloads() {
		if w.Name == name {
			in.Dst = w
		}
	}
	var p int
	fmt.Sscan(port, &p)
	in.DstPort = uint16(p)
	return in
}

// verdict renders a decision compactly: "reason policy#rule audit=...".
func verdict(d Decision) string {
	s := d.Reason.String()
	if d.Policy != "" {
		s += " " + d.Policy
	}
	if d.Rule >= 0 {
		s += fmt.Sprintf("#%d", d.Rule)
	}
	for _, h := range d.AuditHits() {
		s += fmt.Sprintf(" audit=%s#%d", h.Policy, h.Rule)
	}
	if d.AuditCount > MaxAuditHits {
		s += fmt.Sprintf(" audits=%d", d.AuditCount)
	}
	return s
}

const (
	allowCheckout  = `shop/pay-allow {selector: {matchLabels: {app: payments}}, action: ALLOW, rules: [{from: [{principals: [spiffe://cluster.local/ns/shop/sa/checkout]}], to: {ports: [8443]}}]}`
	denyFromWeb    = `shop/deny-web {action: DENY, rules: [{from: [{namespaces: [web]}]}]}`
	auditAll       = `shop/audit-all {selector: {matchLabels: {app: payments}}, action: AUDIT, rules: [{from: [{notPrincipals: [spiffe://cluster.local/ns/shop/sa/checkout]}]}]}`
	meshDefaultDen = `mantlet-system/default-deny {defaultDeny: true}`
	strictShop     = `shop/strict {mtls: STRICT}`
)

func TestDecide(t *testing.T) {
	co := "shop/checkout@10.0.1.2"
	fe := "web/frontend@10.0.2.1"
	tests := []struct {
		name     string
		policies []string
		src, dst string
		want     string
	}{
		// No policy.
		{"with no policy everything is allowed", nil, fe, "payments:8443", "allowed-by-default"},
		{"a destination outside the mesh is not judged", []string{meshDefaultDen}, fe, "nowhere:80", "allowed-not-meshed"},
		// The running example: checkout may call payments on 8443, nothing else may.
		{"checkout may call payments on 8443", []string{allowCheckout}, co, "payments:8443", "allowed-by-policy shop/pay-allow#0"},
		{"checkout may not call payments on another port", []string{allowCheckout}, co, "payments:9090", "no-allow-matched"},
		{"frontend may not call payments", []string{allowCheckout}, fe, "payments:8443", "no-allow-matched"},
		{"plaintext may not call payments", []string{allowCheckout}, "@10.0.1.2", "payments:8443", "no-allow-matched"},
		{"a workload the ALLOW does not select stays open", []string{allowCheckout}, fe, "checkout:8080", "allowed-by-default"},
		// Principals.
		{"principal prefix wildcard", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["spiffe://cluster.local/ns/web/*"]}]}]}`}, fe, "payments:1", "allowed-by-policy shop/a#0"},
		{"principal prefix wildcard other namespace", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["spiffe://cluster.local/ns/web/*"]}]}]}`}, co, "payments:1", "no-allow-matched"},
		{"principal suffix wildcard", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["*/sa/frontend"]}]}]}`}, fe, "payments:1", "allowed-by-policy shop/a#0"},
		{"principal * admits any authenticated source", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["*"]}]}]}`}, "id=spiffe://other.org/x@10.9.0.1", "payments:1", "allowed-by-policy shop/a#0"},
		{"principal * refuses plaintext", []string{`shop/a {action: ALLOW, rules: [{from: [{principals: ["*"]}]}]}`}, "@10.9.0.1", "payments:1", "no-allow-matched"},
		{"notPrincipals excludes the listed", []string{`shop/a {action: ALLOW, rules: [{from: [{notPrincipals: ["spiffe://cluster.local/ns/web/sa/frontend"]}]}]}`}, fe, "payments:1", "no-allow-matched"},
		{"notPrincipals admits the others", []string{`shop/a {action: ALLOW, rules: [{from: [{notPrincipals: ["spiffe://cluster.local/ns/web/sa/frontend"]}]}]}`}, co, "payments:1", "allowed-by-policy shop/a#0"},
		{"DENY notPrincipals * refuses plaintext", []string{`shop/a {action: DENY, rules: [{from: [{notPrincipals: ["*"]}]}]}`}, "@10.0.2.1", "payments:1", "denied-by-policy shop/a#0"},
		{"DENY notPrincipals * lets mTLS through", []string{`shop/a {action: DENY, rules: [{from: [{notPrincipals: ["*"]}]}]}`}, fe, "payments:1", "allowed-by-default"},
		// Namespaces.
		{"namespaces match the source identity's namespace", []string{denyFromWeb}, fe, "payments:1", "denied-by-policy shop/deny-web#0"},
		{"namespaces do not match other namespaces", []string{denyFromWeb}, co, "payments:1", "allowed-by-default"},
		{"namespaces never match plaintext", []string{denyFromWeb}, "@10.0.2.1", "payments:1", "allowed-by-default"},
		{"namespaces ignore foreign trust domains", []string{denyFromWeb}, "id=spiffe://other.org/ns/web/sa/frontend@10.0.2.1", "payments:1", "allowed-by-default"},
		{"notNamespaces", []string{`shop/a {action: ALLOW, rules: [{from: [{notNamespaces: [web]}]}]}`}, fe, "payments:1", "no-allow-matched"},
		{"notNamespaces admits other namespaces", []string{`shop/a {action: ALLOW, rules: [{from: [{notNamespaces: [web]}]}]}`}, co, "payments:1", "allowed-by-policy shop/a#0"},
		// Service accounts.
		{"serviceAccounts bare name is in the policy's namespace", []string{`shop/a {action: ALLOW, rules: [{from: [{serviceAccounts: [checkout]}]}]}`}, co, "payments:1", "allowed-by-policy shop/a#0"},
		{"serviceAccounts bare name is not another namespace's", []string{`shop/a {action: ALLOW, rules: [{from: [{serviceAccounts: [checkout]}]}]}`}, "web/checkout@10.0.2.9", "payments:1", "no-allow-matched"},
		{"serviceAccounts namespace/name", []string{`shop/a {action: ALLOW, rules: [{from: [{serviceAccounts: [web/frontend]}]}]}`}, fe, "payments:1", "allowed-by-policy shop/a#0"},
		{"notServiceAccounts", []string{`shop/a {action: DENY, rules: [{from: [{notServiceAccounts: [checkout]}]}]}`}, fe, "payments:1", "denied-by-policy shop/a#0"},
		{"notServiceAccounts spares the listed", []string{`shop/a {action: DENY, rules: [{from: [{notServiceAccounts: [checkout]}]}]}`}, co, "payments:1", "allowed-by-default"},
		// IP blocks.
		{"ipBlocks admit plaintext from the block", []string{`shop/a {action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 192.168.0.0/16, except: [192.168.9.0/24]}]}]}]}`}, "@192.168.1.1", "payments:1", "allowed-by-policy shop/a#0"},
		{"ipBlocks except", []string{`shop/a {action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 192.168.0.0/16, except: [192.168.9.0/24]}]}]}]}`}, "@192.168.9.1", "payments:1", "no-allow-matched"},
		{"ipBlocks match IPv4-mapped sources", []string{`shop/a {action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 192.168.0.0/16}]}]}]}`}, "@::ffff:192.168.1.1", "payments:1", "allowed-by-policy shop/a#0"},
		{"ipBlocks IPv6", []string{`shop/a {action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: "fd00::/8"}]}]}]}`}, "@fd00::1", "payments:1", "allowed-by-policy shop/a#0"},
		{"notIpBlocks", []string{`shop/a {action: DENY, rules: [{from: [{notIpBlocks: [{cidr: 10.0.0.0/8}]}]}]}`}, "@192.168.1.1", "payments:1", "denied-by-policy shop/a#0"},
		{"notIpBlocks spares the block", []string{`shop/a {action: DENY, rules: [{from: [{notIpBlocks: [{cidr: 10.0.0.0/8}]}]}]}`}, co, "payments:1", "allowed-by-default"},
		{"fields of one source are ANDed", []string{`shop/a {action: ALLOW, rules: [{from: [{namespaces: [shop], ipBlocks: [{cidr: 10.0.2.0/24}]}]}]}`}, co, "payments:1", "no-allow-matched"},
		{"sources of one rule are ORed", []string{`shop/a {action: ALLOW, rules: [{from: [{namespaces: [web]}, {ipBlocks: [{cidr: 10.0.1.0/24}]}]}]}`}, co, "payments:1", "allowed-by-policy shop/a#0"},
		// Ports.
		{"port range", []string{`shop/a {action: ALLOW, rules: [{to: {ports: ["9000-9100"]}}]}`}, fe, "payments:9050", "allowed-by-policy shop/a#0"},
		{"port range end is inclusive", []string{`shop/a {action: ALLOW, rules: [{to: {ports: ["9000-9100"]}}]}`}, fe, "payments:9101", "no-allow-matched"},
		{"notPorts", []string{`shop/a {action: ALLOW, rules: [{to: {ports: ["1-65535"], notPorts: [22]}}]}`}, fe, "payments:22", "no-allow-matched"},
		{"second rule matches", []string{`shop/a {action: ALLOW, rules: [{to: {ports: [1]}}, {to: {ports: [2]}}]}`}, fe, "payments:2", "allowed-by-policy shop/a#1"},
		// Selectors and the root namespace.
		{"selector matchExpressions", []string{`shop/a {selector: {matchExpressions: [{key: tier, operator: In, values: [backend]}]}, action: DENY, rules: [{}]}`}, co, "payments:1", "denied-by-policy shop/a#0"},
		{"selector matchExpressions spares others", []string{`shop/a {selector: {matchExpressions: [{key: tier, operator: In, values: [backend]}]}, action: DENY, rules: [{}]}`}, fe, "checkout:1", "allowed-by-default"},
		{"a policy selects only its own namespace", []string{`web/a {action: DENY, rules: [{}]}`}, co, "payments:1", "allowed-by-default"},
		{"a root namespace policy applies mesh-wide", []string{`mantlet-system/a {action: DENY, rules: [{from: [{namespaces: [web]}]}]}`}, fe, "checkout:1", "denied-by-policy mantlet-system/a#0"},
		{"a root namespace selector spans namespaces", []string{`mantlet-system/a {selector: {matchLabels: {app: frontend}}, action: DENY, rules: [{}]}`}, co, "frontend:1", "denied-by-policy mantlet-system/a#0"},
		// Precedence.
		{"DENY beats ALLOW", []string{allowCheckout, `shop/deny {action: DENY, rules: [{to: {ports: [8443]}}]}`}, co, "payments:8443", "denied-by-policy shop/deny#0"},
		{"of two DENYs the first by namespace/name reports", []string{`shop/z {action: DENY, rules: [{}]}`, `shop/b {action: DENY, rules: [{to: {ports: [1]}}, {}]}`}, co, "payments:2", "denied-by-policy shop/b#1"},
		{"ALLOWs are a union", []string{allowCheckout, `shop/b {action: ALLOW, rules: [{from: [{namespaces: [web]}]}]}`}, fe, "payments:1", "allowed-by-policy shop/b#0"},
		{"an ALLOW without rules admits nothing", []string{`shop/none {action: ALLOW}`}, co, "payments:1", "no-allow-matched"},
		{"rules: [{}] matches everything", []string{`shop/all {action: ALLOW, rules: [{}]}`}, "@1.2.3.4", "payments:1", "allowed-by-policy shop/all#0"},
		// Default deny.
		{"mesh-wide default deny from the root namespace", []string{meshDefaultDen}, co, "payments:8443", "denied-by-default-deny"},
		{"default deny yields to an ALLOW", []string{meshDefaultDen, allowCheckout}, co, "payments:8443", "allowed-by-policy shop/pay-allow#0"},
		{"default deny with an ALLOW that does not match", []string{meshDefaultDen, allowCheckout}, fe, "payments:8443", "no-allow-matched"},
		{"namespace default deny spares other namespaces", []string{`web/dd {defaultDeny: true}`}, fe, "payments:8443", "allowed-by-default"},
		// AUDIT.
		{"AUDIT records and does not block", []string{auditAll}, fe, "payments:8443", "allowed-by-default audit=shop/audit-all#0"},
		{"AUDIT records beside an ALLOW", []string{auditAll, allowCheckout}, fe, "payments:8443", "no-allow-matched audit=shop/audit-all#0"},
		{"AUDIT silent when its rule does not match", []string{auditAll, allowCheckout}, co, "payments:8443", "allowed-by-policy shop/pay-allow#0"},
		{"AUDIT reports each policy once, first rule", []string{`shop/au {action: AUDIT, rules: [{to: {ports: [2]}}, {}, {}]}`, `shop/au2 {action: AUDIT, rules: [{}]}`}, co, "payments:1", "allowed-by-default audit=shop/au#1 audit=shop/au2#0"},
		{"AUDIT counts beyond the recorded hits", []string{`shop/a1 {action: AUDIT, rules: [{}]}`, `shop/a2 {action: AUDIT, rules: [{}]}`, `shop/a3 {action: AUDIT, rules: [{}]}`, `shop/a4 {action: AUDIT, rules: [{}]}`, `shop/a5 {action: AUDIT, rules: [{}]}`}, co, "payments:1", "allowed-by-default audit=shop/a1#0 audit=shop/a2#0 audit=shop/a3#0 audit=shop/a4#0 audits=5"},
		// mTLS mode.
		{"STRICT refuses plaintext", []string{strictShop}, "@10.0.2.1", "payments:1", "denied-plaintext-strict shop/strict"},
		{"STRICT admits mTLS", []string{strictShop}, fe, "payments:1", "allowed-by-default"},
		{"PERMISSIVE workload in a STRICT namespace admits plaintext", []string{strictShop, `shop/p {selector: {matchLabels: {app: payments}}, mtls: PERMISSIVE}`}, "@10.0.2.1", "payments:1", "allowed-by-default"},
		{"STRICT still records AUDIT", []string{strictShop, auditAll}, "@10.0.2.1", "payments:1", "denied-plaintext-strict shop/strict audit=shop/audit-all#0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, snap := testEngine(t, Options{}, tt.policies...)
			in := input(t, snap, tt.src, tt.dst)
			d := e.Decide(in)
			if got := verdict(d); got != tt.want {
				t.Errorf("Decide(%s -> %s) = %q, want %q", tt.src, tt.dst, got, tt.want)
			}
			if allowed := strings.HasPrefix(tt.want, "allowed"); d.Allowed != allowed {
				t.Errorf("Allowed = %v, want %v", d.Allowed, allowed)
			}
			if want := reference(t, tt.policies, Options{}, in); verdict(want) != verdict(d) {
				t.Errorf("reference evaluation says %q", verdict(want))
			}
		})
	}
}

func TestDecideOptions(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		src  string
		want string
	}{
		{"option DefaultDeny denies unselected workloads", Options{DefaultDeny: true}, "shop/checkout@10.0.1.2", "denied-by-default-deny"},
		{"option DefaultMTLS STRICT refuses plaintext", Options{DefaultMTLS: v1alpha1.MTLSStrict}, "@10.0.1.2", "denied-plaintext-strict"},
		{"a custom root namespace applies mesh-wide", Options{RootNamespace: "web"}, "shop/checkout@10.0.1.2", "denied-by-policy web/deny#0"},
		{"another trust domain's IDs carry no namespace", Options{TrustDomain: spiffeid.RequireTrustDomainFromString("other.org")}, "shop/checkout@10.0.1.2", "allowed-by-default"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, snap := testEngine(t, tt.opts, `web/deny {action: DENY, rules: [{from: [{namespaces: [shop]}]}]}`)
			d := e.Decide(input(t, snap, tt.src, "payments:1"))
			if got := verdict(d); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDecideExplicitSourceIdentity(t *testing.T) {
	e, snap := testEngine(t, Options{}, denyFromWeb)
	in := input(t, snap, "id=spiffe://other.org/team/x@10.0.2.1", "payments:1")
	in.SrcNamespace, in.SrcServiceAccount = "web", "x"
	if got := verdict(e.Decide(in)); got != "denied-by-policy shop/deny-web#0" {
		t.Errorf("caller-supplied namespace: got %q", got)
	}
	in.MTLS = false
	if got := verdict(e.Decide(in)); got != "allowed-by-default" {
		t.Errorf("plaintext must ignore the supplied identity: got %q", got)
	}
}

func TestMTLSModeAndRateLimit(t *testing.T) {
	e, snap := testEngine(t, Options{},
		`mantlet-system/mesh {mtls: PERMISSIVE, rateLimit: {connectionsPerSecond: 100, maxConnections: 1000}}`,
		`shop/ns {mtls: STRICT, rateLimit: {connectionsPerSecond: 50, burst: 80}}`,
		`shop/ns2 {rateLimit: {connectionsPerSecond: 70, maxConnections: 10}}`,
		`shop/pay {selector: {matchLabels: {app: payments}}, mtls: PERMISSIVE, rateLimit: {maxConnections: 5}}`,
		`mantlet-system/fe {selector: {matchLabels: {app: frontend}}, mtls: STRICT}`,
	)
	byName := map[string]*workload.Workload{}
	for _, w := range snap.Workloads() {
		byName[w.Name] = w
	}
	tests := []struct {
		workload string
		mode     v1alpha1.MTLSMode
		rate     string
	}{
		{"payments", v1alpha1.MTLSPermissive, "0/s burst 0 max 5 by shop/pay"},
		{"checkout", v1alpha1.MTLSStrict, "50/s burst 80 max 10 by shop/ns"},
		{"frontend", v1alpha1.MTLSStrict, "100/s burst 100 max 1000 by mantlet-system/mesh"},
	}
	for _, tt := range tests {
		w := byName[tt.workload]
		if got := e.MTLSMode(w); got != tt.mode {
			t.Errorf("MTLSMode(%s) = %s, want %s", w, got, tt.mode)
		}
		rl, ok := e.RateLimit(w)
		got := fmt.Sprintf("%d/s burst %d max %d by %s", rl.ConnectionsPerSecond, rl.Burst, rl.MaxConnections, rl.Policy)
		if !ok || got != tt.rate {
			t.Errorf("RateLimit(%s) = %q %v, want %q", w, got, ok, tt.rate)
		}
	}
	if got := e.MTLSMode(nil); got != v1alpha1.MTLSPermissive {
		t.Errorf("MTLSMode(nil) = %s, want the default PERMISSIVE", got)
	}
	e2, snap2 := testEngine(t, Options{})
	if _, ok := e2.RateLimit(snap2.Workloads()[0]); ok {
		t.Error("RateLimit without policies reported a limit")
	}
}

func TestMTLSTieGoesToStrict(t *testing.T) {
	for _, order := range [][]string{{`shop/a {mtls: STRICT}`, `shop/b {mtls: PERMISSIVE}`}, {`shop/a {mtls: PERMISSIVE}`, `shop/b {mtls: STRICT}`}} {
		e, snap := testEngine(t, Options{}, order...)
		if got := e.MTLSMode(snap.Workloads()[0]); got != v1alpha1.MTLSStrict {
			t.Errorf("%v: MTLSMode = %s, want STRICT", order, got)
		}
	}
}

func TestUpdateKeepsPreviousSetOnError(t *testing.T) {
	e, snap := testEngine(t, Options{}, allowCheckout)
	gen := e.Generation()
	in := input(t, snap, "web/frontend@10.0.2.1", "payments:8443")
	err := e.Update([]*v1alpha1.MeshPolicy{pol(t, `shop/ok {action: ALLOW, rules: [{}]}`), {}})
	if err == nil {
		t.Fatal("Update accepted a set with an invalid policy")
	}
	want := "policy: set of 2 rejected, generation 1 stays in force: MeshPolicy /: metadata.name: required; metadata.namespace: required (MeshPolicy is namespaced); spec: sets nothing; want an action with rules, mtls, rateLimit or defaultDeny"
	if err.Error() != want {
		t.Errorf("error:\n got %s\nwant %s", err, want)
	}
	if e.Generation() != gen {
		t.Errorf("generation moved from %d to %d on a rejected update", gen, e.Generation())
	}
	if got := verdict(e.Decide(in)); got != "no-allow-matched" {
		t.Errorf("after a rejected update: %q, want the old set's no-allow-matched", got)
	}
	if err := e.Update([]*v1alpha1.MeshPolicy{pol(t, `shop/ok {action: ALLOW, rules: [{}]}`)}); err != nil {
		t.Fatal(err)
	}
	if got := verdict(e.Decide(in)); got != "allowed-by-policy shop/ok#0" || e.Generation() != gen+1 {
		t.Errorf("after a good update: %q generation %d", got, e.Generation())
	}
}

func TestDecideUnknownOrChangedWorkload(t *testing.T) {
	e, snap := testEngine(t, Options{}, `shop/a {selector: {matchLabels: {app: payments}}, action: DENY, rules: [{}]}`)
	in := input(t, snap, "web/frontend@10.0.2.1", "payments:1")
	relabelled := *in.Dst
	relabelled.Labels = map[string]string{"app": "other"}
	stranger := relabelled
	stranger.UID, stranger.Labels = "new", map[string]string{"app": "payments"}
	copied := *in.Dst
	tests := []struct {
		name string
		dst  *workload.Workload
		want string
	}{
		{"a workload the engine knows", in.Dst, "denied-by-policy shop/a#0"},
		{"an equal copy from a newer snapshot", &copied, "denied-by-policy shop/a#0"},
		{"the same UID with new labels", &relabelled, "allowed-by-default"},
		{"a workload the engine has not seen", &stranger, "denied-by-policy shop/a#0"},
	}
	for _, tt := range tests {
		in.Dst = tt.dst
		if got := verdict(e.Decide(in)); got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestDecideDoesNotAllocate(t *testing.T) {
	e, snap := testEngine(t, Options{}, allowCheckout, denyFromWeb, auditAll, strictShop,
		`shop/wild {action: ALLOW, rules: [{from: [{principals: ["*/sa/x"]}, {serviceAccounts: [web/x]}, {ipBlocks: [{cidr: 10.0.0.0/8}]}]}]}`)
	inputs := []Input{
		input(t, snap, "shop/checkout@10.0.1.2", "payments:8443"),
		input(t, snap, "web/frontend@10.0.2.1", "payments:8443"),
		input(t, snap, "@10.0.2.1", "payments:8443"),
		input(t, snap, "id=spiffe://other.org/a/b@10.0.2.1", "checkout:80"),
		input(t, snap, "id=spiffe://cluster.local/vm/db@10.0.2.1", "checkout:80"),
	}
	for _, in := range inputs {
		if n := testing.AllocsPerRun(100, func() { e.Decide(in) }); n != 0 {
			t.Errorf("Decide(%v -> %s) allocates %v times", in.SrcID, in.Dst, n)
		}
		if n := testing.AllocsPerRun(100, func() { e.MTLSMode(in.Dst); e.RateLimit(in.Dst) }); n != 0 {
			t.Errorf("MTLSMode/RateLimit(%s) allocate %v times", in.Dst, n)
		}
	}
}

func TestReasonStrings(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		s := r.String()
		if s == "" || s == "unknown" || seen[s] {
			t.Errorf("reason %d has name %q", r, s)
		}
		seen[s] = true
	}
	if got := Reason(200).String(); got != "unknown" {
		t.Errorf("out-of-range reason: %q", got)
	}
}

// TestDecideDuringUpdates runs decisions while policy sets and snapshots
// are replaced (run with -race): every verdict must be one of the two
// sets', never a mix or a crash.
func TestDecideDuringUpdates(t *testing.T) {
	e, snap := testEngine(t, Options{}, allowCheckout)
	sets := [][]*v1alpha1.MeshPolicy{
		{pol(t, allowCheckout)},
		{pol(t, `shop/deny {action: DENY, rules: [{}]}`)},
	}
	in := input(t, snap, "shop/checkout@10.0.1.2", "payments:8443")
	done := make(chan struct{})
	errs := make(chan string, 1)
	go func() {
		defer close(done)
		for range 20000 {
			switch got := verdict(e.Decide(in)); got {
			case "allowed-by-policy shop/pay-allow#0", "denied-by-policy shop/deny#0":
			default:
				errs <- got
				return
			}
		}
	}()
	for i := 0; ; i++ {
		select {
		case <-done:
			select {
			case got := <-errs:
				t.Fatalf("a decision during updates was %q", got)
			default:
			}
			return
		default:
		}
		if err := e.Update(sets[i%2]); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			e.SetWorkloads(snap)
		}
		if i%5 == 0 {
			e.SetWorkloads(nil)
		}
	}
}
