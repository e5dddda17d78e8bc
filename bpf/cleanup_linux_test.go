package bpf

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

// openAt opens a data path of the test's node namespace pinned in dir.
func (tb *testbed) openAt(t *testing.T, dir string) (*Datapath, error) {
	t.Helper()
	cfg := tb.cfg
	cfg.PinDir = dir
	d, err := Open(context.Background(), cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err == nil {
		t.Cleanup(func() { d.Close() })
	}
	return d, err
}

// TestCleanupNeverTouchesWhatALiveAgentUses: a stale data path pinned in
// another directory for the same namespace (a failed start, a second
// agent) is cleaned up without taking the running agent's rule with it.
func TestCleanupNeverTouchesWhatALiveAgentUses(t *testing.T) {
	tb := newTopology(t)
	tb.cfg = testConfig(t)
	stale, err := tb.openAt(t, testPinDir(t))
	if err != nil {
		t.Fatalf("Open the stale data path: %v", err)
	}
	stale.Close()
	tb.open(t) // warns about the stale one
	tb.enroll(t, false)
	tb.outbound = tb.listen(t, Outbound)
	tb.hbone = tb.listen(t, HBONE)

	rep, err := Cleanup(context.Background(), stale.cfg.PinDir)
	if err != nil {
		t.Fatalf("Cleanup of the stale data path: %v", err)
	}
	want := "kept: the data path pinned at " + tb.cfg.PinDir + " uses it"
	if !rep.Found || rep.Rule != want || rep.Route != want || !rep.PinsRemoved {
		t.Errorf("Cleanup reported %+v, want the rule and route kept for %s", rep, tb.cfg.PinDir)
	}
	if ps := tb.d.Check(); len(ps) > 0 {
		t.Errorf("the live data path lost state to the cleanup: %v", ps)
	}
	real := listenIn(t, tb.remote, "198.51.100.7:8080")
	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("pod dial after the cleanup: %v", err)
	}
	exchange(t, client, accept(t, tb.outbound))
	nothingAccepted(t, real)
}

// TestOpenRefusesASecondAgentInTheNamespace: a second data path for a
// namespace whose agent runs fails before it loads or attaches anything.
func TestOpenRefusesASecondAgentInTheNamespace(t *testing.T) {
	tb := newTestbed(t, false)
	dir := testPinDir(t)
	if _, err := tb.openAt(t, dir); !errors.Is(err, ErrNamespaceInUse) || !strings.Contains(err.Error(), tb.cfg.PinDir) {
		t.Fatalf("second Open in the namespace: %v, want ErrNamespaceInUse naming %s", err, tb.cfg.PinDir)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused Open left %s behind: %v", dir, err)
	}
	if n := skLookupCount(t, tb.node); n != 1 {
		t.Errorf("%d sk_lookup programs on the namespace, want the running agent's only", n)
	}
}

// TestCleanupFromAnotherNamespace refuses and removes nothing.
func TestCleanupFromAnotherNamespace(t *testing.T) {
	tb := newTestbed(t, false)
	tb.d.Close()
	var (
		rep CleanupReport
		err error
	)
	inNS(t, tb.remote, func() { rep, err = Cleanup(context.Background(), tb.cfg.PinDir) })
	if err == nil || !strings.Contains(err.Error(), "run the cleanup in the node's namespace") || !strings.Contains(err.Error(), "nothing was removed") {
		t.Fatalf("Cleanup from another namespace: %v, want a refusal that says where to run it", err)
	}
	if rep.PinsRemoved || len(rep.Detached) > 0 {
		t.Errorf("the refused cleanup reported %+v", rep)
	}
	if _, err := os.Stat(tb.cfg.PinDir); err != nil {
		t.Errorf("pins after a refused cleanup: %v", err)
	}
	if ok, err := hasRuleIn(tb.cfg); !ok || err != nil {
		t.Errorf("the rule after a refused cleanup: present=%v (%v)", ok, err)
	}
}

// TestCleanupOfAMissingPinDirNamesTheOthers: the wrong pin dir (the
// default where the agent ran with --pin-dir) finds nothing, says so, and
// names the data paths pinned for this namespace.
func TestCleanupOfAMissingPinDirNamesTheOthers(t *testing.T) {
	tb := newTestbed(t, false)
	missing := testPinDir(t)
	rep, err := Cleanup(context.Background(), missing)
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	want := "nothing pinned at " + missing + ": nothing removed; data paths pinned for this network namespace: " + tb.cfg.PinDir + " (name one with --pin-dir)"
	if rep.String() != want {
		t.Errorf("report %q, want %q", rep, want)
	}
}

// TestRemoveRollsBackAFreshDataPath: what Open made, Remove unmakes.
func TestRemoveRollsBackAFreshDataPath(t *testing.T) {
	tb := newTestbed(t, false)
	if !tb.d.Created() {
		t.Fatal("Created() = false for a fresh data path")
	}
	rep, err := tb.d.Remove(context.Background())
	if err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if len(rep.Detached) != 5 || rep.Rule != "removed" || rep.Route != "removed" || !rep.PinsRemoved {
		t.Errorf("Remove reported %+v", rep)
	}
	if _, err := os.Stat(tb.cfg.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins after Remove: %v", err)
	}
	if n := skLookupCount(t, tb.node); n != 0 {
		t.Errorf("%d sk_lookup programs left after Remove", n)
	}
	if ok, _ := hasRuleIn(tb.cfg); ok {
		t.Error("the rule is left after Remove")
	}
	tb.d.Close() // harmless after Remove
}

// hasRuleIn reports whether the capture rule of cfg is installed in the
// calling thread's namespace.
func hasRuleIn(cfg Config) (bool, error) {
	r := ruleOf(mantletSettings{RedirectMark: cfg.RedirectMark, MarkMask: cfg.MarkMask, RouteTable: uint32(cfg.RouteTable), RulePriority: uint32(cfg.RulePriority)})
	rules, err := netlink.RuleListFiltered(netlink.FAMILY_V4, r, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PRIORITY)
	return len(rules) > 0, err
}
