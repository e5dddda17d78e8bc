package enforce

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/ztunnel"
)

const testPolicies = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-allow-checkout}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/checkout"]}]
    to: {ports: [8443]}
  - from: [{ipBlocks: [{cidr: 127.0.9.0/24}]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-deny-legacy}
spec:
  selector: {matchLabels: {app: payments}}
  action: DENY
  rules:
  - from: [{namespaces: [legacy]}]
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-audit-admin}
spec:
  selector: {matchLabels: {app: payments}}
  action: AUDIT
  rules:
  - from: [{serviceAccounts: [admin]}]
  - from: [{principals: ["*/sa/checkout"]}]
    to: {ports: [8443]}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: payments-limits}
spec:
  selector: {matchLabels: {app: payments}}
  rateLimit: {connectionsPerSecond: 2, burst: 2, maxConnections: 3}
---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: vault, name: vault-defaults}
spec:
  mtls: STRICT
  defaultDeny: true
`

var (
	td        = spiffeid.RequireTrustDomainFromString("cluster.local")
	ipFront   = netip.MustParseAddr("127.0.1.1")
	ipCheck   = netip.MustParseAddr("127.0.1.2")
	ipPay     = netip.MustParseAddr("127.0.2.1")
	ipVault   = netip.MustParseAddr("127.0.2.2")
	ipLegacy  = netip.MustParseAddr("127.0.1.3")
	ipAdmin   = netip.MustParseAddr("127.0.1.4")
	ipOffice  = netip.MustParseAddr("127.0.9.9")
	ipOutside = netip.MustParseAddr("127.0.3.1")
)

func id(ns, sa string) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+sa)
}

func testSnapshot(t testing.TB, payLabels map[string]string) *workload.Snapshot {
	t.Helper()
	wl := func(uid, name, ns, sa, node string, ip netip.Addr, labels map[string]string) workload.Workload {
		return workload.Workload{UID: uid, Name: name, Namespace: ns, ServiceAccount: sa, Node: node,
			IPs: []netip.Addr{ip}, Labels: labels, Enrolled: true}
	}
	snap, err := workload.New(
		[]workload.Node{{Name: "node-a", IP: netip.MustParseAddr("127.0.0.11")}, {Name: "node-b", IP: netip.MustParseAddr("127.0.0.12")}},
		[]workload.Workload{
			wl("front", "frontend-0", "shop", "frontend", "node-a", ipFront, map[string]string{"app": "frontend"}),
			wl("check", "checkout-0", "shop", "checkout", "node-a", ipCheck, map[string]string{"app": "checkout"}),
			wl("legacy", "old-0", "legacy", "old", "node-a", ipLegacy, nil),
			wl("admin", "admin-0", "shop", "admin", "node-a", ipAdmin, nil),
			wl("pay", "payments-0", "shop", "payments", "node-b", ipPay, payLabels),
			wl("vault", "vault-0", "vault", "vault", "node-b", ipVault, nil),
		}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// recorder is an events.Sink that keeps events.
type recorder struct {
	mu sync.Mutex
	ev []events.Flow
}

func (r *recorder) Emit(e *events.Flow) {
	r.mu.Lock()
	r.ev = append(r.ev, *e)
	r.mu.Unlock()
}

// take returns the events so far as "event stage verdict reason flag
// [policy[rule]] [audit:policy[rule]]" strings and forgets them.
func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.ev {
		s := strings.Join([]string{e.Event, e.Stage, e.Verdict, e.Reason, e.ResponseFlag}, " ")
		if e.Policy != "" {
			s += fmt.Sprintf(" %s[%d]", e.Policy, e.Rule)
		}
		if e.AuditPolicy != "" {
			s += fmt.Sprintf(" audit:%s[%d]", e.AuditPolicy, e.AuditRule)
		}
		out = append(out, s)
	}
	r.ev = nil
	return out
}

type fixture struct {
	eng  *policy.Engine
	az   *Authorizer
	rec  *recorder
	snap *workload.Snapshot
	now  time.Time
}

func newFixture(t testing.TB, opts Options) *fixture {
	t.Helper()
	ps, err := policy.Parse([]byte(testPolicies))
	if err != nil {
		t.Fatal(err)
	}
	fx := &fixture{eng: policy.NewEngine(policy.Options{}), rec: &recorder{}, now: time.Unix(1_800_000_000, 0)}
	if err := fx.eng.Update(ps); err != nil {
		t.Fatal(err)
	}
	fx.snap = testSnapshot(t, map[string]string{"app": "payments"})
	fx.eng.SetWorkloads(fx.snap)
	opts.Events = fx.rec
	opts.Now = func() time.Time { return fx.now }
	fx.az = New(fx.eng, opts)
	return fx
}

// flow is an mTLS flow (sa != "") or a plaintext one from srcIP.
func (fx *fixture) flow(srcIP netip.Addr, ns, sa string, dst netip.Addr, port uint16) *ztunnel.Flow {
	f := &ztunnel.Flow{Direction: ztunnel.Inbound, SrcAddr: netip.AddrPortFrom(srcIP, 40000),
		Src: fx.snap.WorkloadByIP(srcIP), Dst: fx.snap.WorkloadByIP(dst), DstAddr: netip.AddrPortFrom(dst, port)}
	if sa != "" {
		f.SrcID, f.MTLS = id(ns, sa), true
	} else {
		f.Direction = ztunnel.InboundPlaintext
	}
	return f
}

func TestAuthorizeVerdictsAndEvents(t *testing.T) {
	fx := newFixture(t, Options{})
	for _, tc := range []struct {
		name       string
		f          *ztunnel.Flow
		wantAllow  bool
		wantFlag   ztunnel.ResponseFlag
		wantPolicy string
		wantEvents []string
	}{
		{"checkout to payments on 8443 is allowed, and audited",
			fx.flow(ipCheck, "shop", "checkout", ipPay, 8443), true, ztunnel.FlagNone, "shop/payments-allow-checkout",
			[]string{"audit connect allowed allowed-by-policy - shop/payments-allow-checkout[0] audit:shop/payments-audit-admin[1]"}},
		{"checkout to payments on 22 is refused",
			fx.flow(ipCheck, "shop", "checkout", ipPay, 22), false, ztunnel.FlagPolicyDenied, "",
			[]string{"deny connect denied no-allow-matched policy_denied"}},
		{"frontend to payments is refused",
			fx.flow(ipFront, "shop", "frontend", ipPay, 8443), false, ztunnel.FlagPolicyDenied, "",
			[]string{"deny connect denied no-allow-matched policy_denied"}},
		{"a namespace DENY wins over nothing",
			fx.flow(ipLegacy, "legacy", "old", ipPay, 8443), false, ztunnel.FlagPolicyDenied, "shop/payments-deny-legacy",
			[]string{"deny connect denied denied-by-policy policy_denied shop/payments-deny-legacy[0]"}},
		{"an audited refusal reports both",
			fx.flow(ipAdmin, "shop", "admin", ipPay, 8443), false, ztunnel.FlagPolicyDenied, "",
			[]string{"audit connect denied no-allow-matched policy_denied audit:shop/payments-audit-admin[0]", "deny connect denied no-allow-matched policy_denied"}},
		{"a plaintext source in the allowed block gets in",
			fx.flow(ipOffice, "", "", ipPay, 9000), true, ztunnel.FlagNone, "shop/payments-allow-checkout", nil},
		{"a plaintext source elsewhere is refused",
			fx.flow(ipOutside, "", "", ipPay, 9000), false, ztunnel.FlagPolicyDenied, "", []string{"deny connect denied no-allow-matched policy_denied"}},
		{"plaintext to a STRICT workload is refused as such",
			fx.flow(ipOutside, "", "", ipVault, 80), false, ztunnel.FlagStrictPlaintext, "vault/vault-defaults",
			[]string{"deny connect denied denied-plaintext-strict strict_plaintext vault/vault-defaults[-1]"}},
		{"mTLS to a default-deny namespace is refused as such",
			fx.flow(ipFront, "shop", "frontend", ipVault, 80), false, ztunnel.FlagDeniedDefault, "",
			[]string{"deny connect denied denied-by-default-deny denied_default"}},
		{"a workload without policies admits anyone",
			fx.flow(ipLegacy, "legacy", "old", ipFront, 80), true, ztunnel.FlagNone, "", nil},
		{"a destination outside the mesh is not judged",
			&ztunnel.Flow{Direction: ztunnel.Outbound, SrcID: id("shop", "frontend"), MTLS: true, DstAddr: netip.AddrPortFrom(ipOutside, 80)},
			true, ztunnel.FlagNone, "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := fx.az.Authorize(context.Background(), tc.f)
			if v.Allow != tc.wantAllow || v.Flag != tc.wantFlag || v.Policy != tc.wantPolicy {
				t.Errorf("verdict allow %v flag %s policy %q; want %v %s %q", v.Allow, v.Flag, v.Policy, tc.wantAllow, tc.wantFlag, tc.wantPolicy)
			}
			if got := fx.rec.take(); !slices.Equal(got, tc.wantEvents) {
				t.Errorf("events\n%q\nwant\n%q", got, tc.wantEvents)
			}
			if v.Allow {
				fx.az.Release(tc.f, v)
			}
		})
	}
	if n := fx.az.Open("pay"); n != 0 {
		t.Fatalf("%d connections still counted after every release", n)
	}
}

func TestEventNamesBothEnds(t *testing.T) {
	fx := newFixture(t, Options{})
	fx.az.Authorize(context.Background(), fx.flow(ipFront, "shop", "frontend", ipPay, 8443))
	fx.rec.mu.Lock()
	defer fx.rec.mu.Unlock()
	e := fx.rec.ev[0]
	e.Time = time.Time{}
	want := events.Flow{Kind: events.KindSecurityEvent, Event: events.Deny, Stage: events.StageConnect, Direction: "inbound", MTLS: true,
		Src:          events.Endpoint{Addr: netip.AddrPortFrom(ipFront, 40000), Workload: "frontend-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/frontend"},
		Dst:          events.Endpoint{Addr: netip.AddrPortFrom(ipPay, 8443), Workload: "payments-0", Namespace: "shop", Identity: "spiffe://cluster.local/ns/shop/sa/payments"},
		ResponseFlag: "policy_denied", Verdict: events.Denied, Reason: "no-allow-matched", Rule: -1}
	if e != want {
		t.Fatalf("event\n%+v\nwant\n%+v", e, want)
	}
}

func TestRateLimitPerSourceTripsAndRecovers(t *testing.T) {
	fx := newFixture(t, Options{})
	ctx := context.Background()
	checkout := fx.flow(ipCheck, "shop", "checkout", ipPay, 8443)
	office := fx.flow(ipOffice, "", "", ipPay, 8443)
	try := func(f *ztunnel.Flow) ztunnel.ResponseFlag {
		v := fx.az.Authorize(ctx, f)
		if v.Allow {
			fx.az.Release(f, v)
		}
		return v.Flag
	}
	var got []string
	for range 3 {
		got = append(got, try(checkout).String())
	}
	got = append(got, try(office).String()) // another source has its own bucket
	fx.now = fx.now.Add(500 * time.Millisecond)
	got = append(got, try(checkout).String(), try(checkout).String()) // one token back at 2/s
	want := []string{"-", "-", "rate_limited", "-", "-", "rate_limited"}
	if !slices.Equal(got, want) {
		t.Fatalf("flags %v, want %v", got, want)
	}
	evs := fx.rec.take()
	if !slices.Contains(evs, "deny connect denied rate-limited rate_limited shop/payments-limits[-1]") {
		t.Fatalf("no rate-limit event in %q", evs)
	}
}

func TestMaxConnectionsCountsOpenFlows(t *testing.T) {
	fx := newFixture(t, Options{})
	ctx := context.Background()
	var open []*ztunnel.Flow
	var verdicts []ztunnel.Verdict
	for i := range 4 {
		fx.now = fx.now.Add(time.Second) // stay under the rate
		f := fx.flow(ipCheck, "shop", "checkout", ipPay, 8443)
		v := fx.az.Authorize(ctx, f)
		if want := i < 3; v.Allow != want {
			t.Fatalf("connection %d: allow %v flag %s, want allow %v", i, v.Allow, v.Flag, want)
		}
		if v.Allow {
			open, verdicts = append(open, f), append(verdicts, v)
		} else if v.Flag != ztunnel.FlagMaxConnections {
			t.Fatalf("connection %d: flag %s", i, v.Flag)
		}
	}
	fx.az.Release(open[0], verdicts[0])
	fx.now = fx.now.Add(time.Second)
	if v := fx.az.Authorize(ctx, fx.flow(ipCheck, "shop", "checkout", ipPay, 8443)); !v.Allow {
		t.Fatalf("after a release: %s", v.Flag)
	}
	if n := fx.az.Open("pay"); n != 3 {
		t.Fatalf("open = %d, want 3", n)
	}
}

func TestLimiterStateIsBounded(t *testing.T) {
	fx := newFixture(t, Options{MaxLimiters: 100, LimiterIdle: time.Minute})
	ctx := context.Background()
	// A flood of plaintext sources (allowed by the office block) and of
	// identities: the buckets never exceed the cap.
	for i := range 10_000 {
		ip := netip.AddrFrom4([4]byte{127, 0, 9, byte(i)})
		f := fx.flow(ip, "", "", ipPay, 8443)
		if i%2 == 1 {
			f.SrcID, f.MTLS = id("shop", fmt.Sprintf("checkout-%d", i)), true
		}
		v := fx.az.Authorize(ctx, f)
		if v.Allow {
			fx.az.Release(f, v)
		}
		if n := fx.az.lim.len(); n > 100 {
			t.Fatalf("after %d sources: %d buckets, cap 100", i+1, n)
		}
	}
	// Idle buckets expire as traffic goes on.
	fx.now = fx.now.Add(2 * time.Minute)
	for range 30 {
		fx.az.Authorize(ctx, fx.flow(ipCheck, "shop", "checkout", ipPay, 8443))
	}
	if n := fx.az.lim.len(); n != 1 {
		t.Fatalf("%d buckets after every other source idled out, want 1", n)
	}
}

func TestPreCheckUsesNoLimits(t *testing.T) {
	for _, tc := range []struct {
		name       string
		opts       Options
		f          func(fx *fixture) *ztunnel.Flow
		wantAllow  bool
		wantEvents []string
	}{
		{"a refused pre-check fails fast with an event", Options{},
			func(fx *fixture) *ztunnel.Flow { return fx.flow(ipFront, "shop", "frontend", ipPay, 8443) },
			false, []string{"deny precheck denied no-allow-matched policy_denied"}},
		{"pre-checks can be turned off", Options{NoPreCheck: true},
			func(fx *fixture) *ztunnel.Flow { return fx.flow(ipFront, "shop", "frontend", ipPay, 8443) },
			true, nil},
		{"an allowed pre-check reports no audit (the destination will)", Options{},
			func(fx *fixture) *ztunnel.Flow { return fx.flow(ipCheck, "shop", "checkout", ipPay, 8443) },
			true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newFixture(t, tc.opts)
			for range 10 { // well over the rate and the connection limit
				f := tc.f(fx)
				f.PreCheck, f.Direction = true, ztunnel.Outbound
				if v := fx.az.Authorize(context.Background(), f); v.Allow != tc.wantAllow {
					t.Fatalf("allow %v flag %s", v.Allow, v.Flag)
				}
			}
			if got := fx.rec.take(); len(got) != 10*len(tc.wantEvents) || (len(got) > 0 && got[0] != tc.wantEvents[0]) {
				t.Fatalf("events %q, want 10 × %q", got, tc.wantEvents)
			}
			if n := fx.az.Open("pay"); n != 0 {
				t.Fatalf("pre-checks counted %d connections", n)
			}
		})
	}
}

func TestAuthorizeAllocations(t *testing.T) {
	fx := newFixture(t, Options{})
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		f    *ztunnel.Flow
	}{
		{"allowed with a rate limit", fx.flow(ipOffice, "", "", ipPay, 8443)},
		{"allowed without policies", fx.flow(ipLegacy, "legacy", "old", ipFront, 80)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx.az.lim.max = 1 << 20
			fx.az.Authorize(ctx, tc.f) // the bucket exists
			n := testing.AllocsPerRun(200, func() {
				fx.now = fx.now.Add(time.Second)
				v := fx.az.Authorize(ctx, tc.f)
				fx.az.Release(tc.f, v)
			})
			if n != 0 {
				t.Fatalf("%v allocations per decision", n)
			}
		})
	}
}

func TestFlagOfEveryRefusingReason(t *testing.T) {
	for _, r := range policy.Reasons() {
		f := Flag(r)
		if strings.HasPrefix(r.String(), "allowed") {
			continue
		}
		if f == ztunnel.FlagNone {
			t.Errorf("%s maps to no flag", r)
		}
	}
}
