package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/admin/admintest"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/telemetry"
)

func client(t *testing.T, addr string) *admin.Client {
	t.Helper()
	c, err := admin.NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestStatusSaysWhatNeedsAttention(t *testing.T) {
	f := admintest.New(t)
	c := client(t, f.Addr)
	f.Pods = append(f.Pods, admintestPending(), agent.PodStatus{Pod: "shop/on-bridge", IP: netip.MustParseAddr("198.19.1.41"),
		Reason: agent.ReasonBridgedCNI, Err: "find veth: route to 198.19.1.41 leaves through cni0, a bridge: " + agent.ErrBridgedCNI.Error()})
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Ready || st.Node != "node-a" || st.Snapshot.Workloads != 4 || st.Snapshot.LocalWorkloads != 3 ||
		st.Snapshot.Enrolled != 2 || st.Snapshot.Pending != 2 || st.Policy.Policies != 3 || st.Policy.Generation != 1 ||
		!st.Datapath.SkLookupAttached || fmt.Sprint(st.Datapath.Listeners) != "[outbound hbone]" || st.Flows.Open != 3 {
		t.Errorf("status = %+v", st)
	}
	want := []string{
		"pod shop/new-0 pending: no veth routes to 198.19.1.40",
		"pod shop/on-bridge refused (BridgedCNINotSupported), not captured: find veth: route to 198.19.1.41 leaves through cni0, a bridge: " + agent.ErrBridgedCNI.Error(),
		"certificate of spiffe://cluster.local/ns/shop/sa/frontend expires in 30m0s",
		"certificate of spiffe://cluster.local/ns/shop/sa/frontend: 3 failed attempts, last: ca: connection refused",
	}
	if strings.Join(st.Problems, "\n") != strings.Join(want, "\n") {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(st.Problems, "\n"), strings.Join(want, "\n"))
	}

	f.Ready, f.Reason = false, "not ready: no hbone listener (:15008) in the SOCKMAP"
	st, err = c.Status(context.Background())
	if err != nil || st.Ready || st.Reason != f.Reason {
		t.Errorf("unready status = %+v, %v", st, err)
	}
}

func TestStatusShowsARejectedEdit(t *testing.T) {
	f := admintest.New(t)
	c := client(t, f.Addr)
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := admin.ConfigStatus{Available: true, Source: "file", File: "/etc/mantlet/cluster.yaml", Applied: 3, Rejected: 1,
		AppliedAt: admintest.Now.Add(-time.Hour), RejectedAt: admintest.Now.Add(-2 * time.Hour)}
	if fmt.Sprint(st.Config) != fmt.Sprint(want) || slices.ContainsFunc(st.Problems, func(p string) bool { return strings.HasPrefix(p, "config:") }) {
		t.Errorf("config = %+v, problems %q\nwant %+v and no config problem", st.Config, st.Problems, want)
	}

	problems := []string{
		`cluster.yaml: document 3 (Pod shop/a): status.podIP "198.19.1.300": not an IP address`,
		`cluster.yaml: document 4 (MeshPolicies shop/p): kind "MeshPolicies": group mantlet.io has no such kind; did you mean MeshPolicy?`,
	}
	f.Config.Rejected, f.Config.RejectedAt, f.Config.LastEditRejected, f.Config.Problems = 2, admintest.Now.Add(-time.Minute), true, problems
	st, err = c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Ready || !st.Config.LastEditRejected || !slices.Equal(st.Config.LastEditProblems, problems) || st.Config.Rejected != 2 {
		t.Errorf("status = %+v; want ready, and the rejected edit with its problems", st)
	}
	wantProblem := `config: last edit rejected at 2026-11-25T11:59:00Z: cluster.yaml: document 3 (Pod shop/a): status.podIP "198.19.1.300": not an IP address (and 1 more problem)`
	if !slices.Contains(st.Problems, wantProblem) {
		t.Errorf("problems:\n%s\nwant among them:\n%s", strings.Join(st.Problems, "\n"), wantProblem)
	}
}

func TestWorkloadsServicesCertsDatapath(t *testing.T) {
	f := admintest.New(t)
	c := client(t, f.Addr)
	ctx := context.Background()
	ws, err := c.Workloads(ctx, "shop")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range ws {
		got = append(got, fmt.Sprintf("%s/%s %s local=%v state=%s veth=%d mtls=%s strict=%v", w.Namespace, w.Name, w.Identity, w.Local, w.State, w.Veth, w.MTLSMode, w.Strict))
	}
	want := []string{
		"shop/checkout-0 spiffe://cluster.local/ns/shop/sa/checkout local=true state=enrolled veth=12 mtls=STRICT strict=true",
		"shop/frontend-0 spiffe://cluster.local/ns/shop/sa/frontend local=true state=enrolled veth=11 mtls=PERMISSIVE strict=false",
		"shop/payments-0 spiffe://cluster.local/ns/shop/sa/payments local=false state= veth=0 mtls=PERMISSIVE strict=false",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("workloads:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	svcs, err := c.Services(ctx, "")
	if err != nil || len(svcs) != 1 || fmt.Sprint(svcs[0]) != "{shop payments [198.18.128.10] [{https 443 8443}] [shop/payments-0]}" {
		t.Errorf("services = %+v, %v", svcs, err)
	}
	certs, err := c.Certs(ctx)
	if err != nil || len(certs) != 2 || certs[1].Serial != "beef" || certs[1].ExpiresInSeconds != 1800 || certs[1].Failures != 3 {
		t.Errorf("certs = %+v, %v", certs, err)
	}
	dp, err := c.Datapath(ctx)
	if err != nil || dp.Counters["redirected"] != 40 || dp.Counters["spoof_dropped"] != 2 || dp.Counters["strict_dropped"] != 1 || dp.Pods != 2 {
		t.Errorf("datapath = %+v, %v", dp, err)
	}
	f.DP.Err = errors.New("bpf: counters: map gone")
	if dp, err := c.Datapath(ctx); err != nil || dp.Error != "bpf: counters: map gone" || dp.Counters != nil {
		t.Errorf("datapath with unreadable counters = %+v, %v", dp, err)
	}
	ps, err := c.Policies(ctx)
	if err != nil || ps.Generation != 1 || len(ps.Policies) != 3 || !strings.Contains(string(ps.Policies[0]), `"payments-allow-checkout"`) {
		t.Errorf("policies = %+v, %v", ps, err)
	}
}

func TestPolicyCheckExplainsTheVerdict(t *testing.T) {
	f := admintest.New(t)
	c := client(t, f.Addr)
	for _, tc := range []struct {
		from, to string
		port     uint16
		want     string // verdict reason policy rule | message
	}{
		{"shop/checkout", "shop/payments-0", 8443, "allowed allowed-by-policy shop/payments-allow-checkout 0 | allowed by rule 0 of ALLOW policy shop/payments-allow-checkout"},
		{"spiffe://cluster.local/ns/shop/sa/checkout", "198.19.2.10:8443", 0, "allowed allowed-by-policy shop/payments-allow-checkout 0 | allowed by rule 0 of ALLOW policy shop/payments-allow-checkout"},
		{"shop/checkout", "shop/payments-0", 22, "denied no-allow-matched  -1 | ALLOW policies select the destination but none of their rules matches: denied"},
		{"shop/checkout", "shop/payments", 443, "allowed allowed-by-policy shop/payments-allow-checkout 0 | allowed by rule 0 of ALLOW policy shop/payments-allow-checkout"},
		{"198.19.1.10", "shop/payments", 443, "denied no-allow-matched  -1 | ALLOW policies select the destination but none of their rules matches: denied"},
		{"198.19.1.10", "198.18.128.10:443", 0, "denied no-allow-matched  -1 | ALLOW policies select the destination but none of their rules matches: denied"},
		{"shop/payments", "shop/frontend-0", 80, "allowed allowed-by-default  -1 | no policy selects the destination: allowed by default"},
		{"198.19.1.30", "shop/frontend-0", 80, "denied denied-by-policy shop/deny-legacy 0 | denied by rule 0 of DENY policy shop/deny-legacy"},
		{"198.19.1.30", "198.19.1.20:80", 0, "denied denied-plaintext-strict shop/checkout-strict -1 | plaintext source, and the destination is STRICT (set by policy shop/checkout-strict): denied"},
		{"shop/frontend", "legacy/legacy-0", 80, "allowed allowed-not-meshed  -1 | the destination is not in the mesh: mesh policy does not apply (allowed)"},
	} {
		res, err := c.Check(context.Background(), tc.from, tc.to, tc.port)
		if err != nil {
			t.Errorf("%s -> %s:%d: %v", tc.from, tc.to, tc.port, err)
			continue
		}
		got := fmt.Sprintf("%s %s %s %d | %s", res.Verdict, res.Reason, res.Policy, res.Rule, res.Message)
		if got != tc.want {
			t.Errorf("%s -> %s:%d:\n got %s\nwant %s", tc.from, tc.to, tc.port, got, tc.want)
		}
	}

	res, err := c.Check(context.Background(), "shop/checkout", "shop/payments", 443)
	if err != nil {
		t.Fatal(err)
	}
	var rule bytes.Buffer
	json.Compact(&rule, res.RuleSpec)
	if rule.String() != `{"from":[{"principals":["spiffe://cluster.local/ns/shop/sa/checkout"]}],"to":{"ports":[8443]}}` ||
		res.Destination.Service != "payments.shop.svc" || res.Destination.IP != "198.19.2.10" || res.Destination.Port != 8443 || res.Destination.Workload != "shop/payments-0" ||
		res.Source.Identity != "spiffe://cluster.local/ns/shop/sa/checkout" || !res.Source.MTLS {
		t.Errorf("check through the service: %+v (rule %s)", res, res.RuleSpec)
	}

	for _, tc := range []struct{ from, to, want string }{
		{"shop", "shop/payments-0", `from "shop": want namespace/serviceaccount, a SPIFFE ID or an IP`},
		{"shop/checkout", "shop/nothing", "to shop/nothing: no workload or service of that name (see mantlet workloads)"},
		{"shop/checkout", "shop/payments-0", "to shop/payments-0: give a port (--port)"},
		{"spiffe://Bad/x", "shop/payments-0", `from "spiffe://Bad/x": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
	} {
		_, err := c.Check(context.Background(), tc.from, tc.to, 0)
		if want := "admin API at " + f.Addr + ": " + tc.want; err == nil || err.Error() != want {
			t.Errorf("%s -> %s: err = %v\nwant %s", tc.from, tc.to, err, want)
		}
	}
}

func TestFlowsFilterAndFollow(t *testing.T) {
	f := admintest.New(t)
	c := client(t, f.Addr)
	f.Flows.Add(admintest.Allowed(1))
	f.Flows.Add(admintest.Denied(2))
	ctx := context.Background()
	evs, err := c.Flows(ctx, telemetry.FlowFilter{Verdict: events.Denied}, 0)
	if err != nil || len(evs) != 1 || evs[0].ID != 2 || evs[0].ResponseFlag != "policy_denied" {
		t.Fatalf("denied flows = %+v, %v", evs, err)
	}
	if _, err := c.Flows(ctx, telemetry.FlowFilter{Verdict: "maybe"}, 0); err == nil || !strings.Contains(err.Error(), `verdict "maybe": want allowed or denied`) {
		t.Errorf("bad filter: %v", err)
	}

	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	got := make(chan events.Flow, 8)
	done := make(chan error, 1)
	go func() {
		done <- c.Follow(fctx, telemetry.FlowFilter{Verdict: events.Denied}, 5,
			func(ev events.Flow) error { got <- ev; return nil }, nil)
	}()
	next := func() uint64 {
		select {
		case ev := <-got:
			return ev.ID
		case <-time.After(5 * time.Second):
			t.Fatal("no flow event streamed")
			return 0
		}
	}
	if id := next(); id != 2 {
		t.Fatalf("first streamed event %d, want the recent denied flow 2", id)
	}
	// New events reach the follower once it is subscribed; allowed ones
	// are filtered out by the server.
	deadline := time.Now().Add(5 * time.Second)
	var id uint64
	for id != 4 && time.Now().Before(deadline) {
		f.Flows.Add(admintest.Allowed(3))
		f.Flows.Add(admintest.Denied(4))
		select {
		case ev := <-got:
			id = ev.ID
		case <-time.After(50 * time.Millisecond):
		}
	}
	if id != 4 {
		t.Fatalf("followed event %d, want 4", id)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Follow after cancel: %v", err)
	}
}

func TestUnreachableAdminSaysSo(t *testing.T) {
	c := client(t, filepath.Join(t.TempDir(), "nobody.sock"))
	_, err := c.Status(context.Background())
	if !errors.Is(err, admin.ErrUnreachable) || !strings.HasPrefix(err.Error(), "cannot reach the admin API at ") {
		t.Errorf("err = %v, want ErrUnreachable with a clear message", err)
	}
	if _, err := admin.NewClient("localhost"); err == nil {
		t.Error("an address without a port was accepted")
	}
}

func TestListenUnixReplacesStaleSocketsOnly(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "run", "node-a", "admin.sock")
	ln, err := admin.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ListenUnix(path); err == nil || !strings.Contains(err.Error(), "another process serves it") {
		t.Errorf("second listener on a live socket: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, %v; want 0660", fi.Mode().Perm(), err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves a stale socket file behind, as a killed agent would
	ln, err = admin.ListenUnix(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln.Close()
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ListenUnix(filepath.Join(dir, "file")); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listening over a regular file: %v", err)
	}
}

func admintestPending() agent.PodStatus {
	return agent.PodStatus{Pod: "shop/new-0", IP: netip.MustParseAddr("198.19.1.40"), Err: "no veth routes to 198.19.1.40"}
}

// TestWarnWithinFollowsTheLifetime: a 24 h SVID counts as expiring in its
// last 2 h, an hour-long one (SPIRE's) only in its last quarter, once its
// renewal at half-life was missed, not during its whole life.
func TestWarnWithinFollowsTheLifetime(t *testing.T) {
	t0 := time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		lifetime time.Duration
		want     time.Duration
	}{
		{24 * time.Hour, 2 * time.Hour},
		{8 * time.Hour, 2 * time.Hour},
		{time.Hour, 15 * time.Minute},
		{30 * time.Second, 7500 * time.Millisecond},
	} {
		if got := admin.WarnWithin(t0, t0.Add(tc.lifetime)); got != tc.want {
			t.Errorf("WarnWithin of a %v SVID = %v, want %v", tc.lifetime, got, tc.want)
		}
	}
	if got := admin.WarnWithin(time.Time{}, t0); got != admin.ExpiryWarning {
		t.Errorf("WarnWithin without a not-before = %v, want %v", got, admin.ExpiryWarning)
	}
}
