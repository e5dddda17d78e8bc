package bpf

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// TestFailClosedWhateverBreaks breaks one piece of the data path's kernel
// state at a time, the way another tool, a CNI restart or a person would,
// and checks that a pod's new connection is then dropped and counted,
// never forwarded to its destination; that Check and Status name what is
// missing; and that Repair brings capture back.
func TestFailClosedWhateverBreaks(t *testing.T) {
	tests := []struct {
		name      string
		breakIt   func(t *testing.T, tb *testbed)
		fault     Fault
		counter   string // the event that must rise; "" when capture still works
		stillWork bool   // the connection is still captured
	}{
		{"the routing rule is deleted", func(t *testing.T, tb *testbed) {
			if err := netlink.RuleDel(tb.d.rule(tb.d.settings())); err != nil {
				t.Fatal(err)
			}
		}, FaultRule, "route_dropped", false},
		{"the capture table is flushed", func(t *testing.T, tb *testbed) {
			routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: tb.cfg.RouteTable}, netlink.RT_FILTER_TABLE)
			if err != nil || len(routes) == 0 {
				t.Fatalf("routes of table %d: %v (%d)", tb.cfg.RouteTable, err, len(routes))
			}
			for _, r := range routes {
				if err := netlink.RouteDel(&r); err != nil {
					t.Fatal(err)
				}
			}
		}, FaultRoute, "route_dropped", false},
		// Routes on lo outlive lo going down: capture goes on; lo is set
		// up again all the same (the node's loopback traffic, and the
		// capture route should it need adding again, depend on it).
		{"lo goes down", func(t *testing.T, tb *testbed) {
			lo, err := netlink.LinkByName("lo")
			if err == nil {
				err = netlink.LinkSetDown(lo)
			}
			if err != nil {
				t.Fatal(err)
			}
		}, FaultLoopback, "", true},
		{"pod_ingress is detached from the pod's veth", func(t *testing.T, tb *testbed) {
			detachPinned(t, filepath.Join(tb.cfg.PinDir, linksDir, attachKey{tb.podIf, rolePodIngress}.pinName()))
		}, FaultAttachment, "leak_dropped", false},
		{"the sk_lookup program is detached", func(t *testing.T, tb *testbed) {
			detachPinned(t, filepath.Join(tb.cfg.PinDir, linksDir, skLookupPin))
		}, FaultSkLookup, "", true},
		{"the pins are removed", func(t *testing.T, tb *testbed) {
			if err := os.RemoveAll(tb.cfg.PinDir); err != nil {
				t.Fatal(err)
			}
		}, FaultPin, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := newTestbed(t, false)
			real := listenIn(t, tb.remote, "198.51.100.7:8080")
			tt.breakIt(t, tb)

			st := tb.d.Status()
			if st.Ready() || !hasFault(tb.d.Check(), tt.fault) {
				t.Errorf("after the fault: Ready() = %v, Check() = %v; want not ready with a %s problem (status %q)", st.Ready(), tb.d.Check(), tt.fault, st)
			}
			before := tb.counters(t)
			client, err := dialFrom(t, tb.pod, net.Dialer{Timeout: time.Second}, ap(realDst, 8080))
			if tt.stillWork {
				if err != nil {
					t.Fatalf("pod dial: %v, want the connection still captured", err)
				}
				exchange(t, client, accept(t, tb.outbound))
			} else if err == nil {
				t.Fatalf("pod dial succeeded (peer %s), want it dropped", client.RemoteAddr())
			}
			nothingAccepted(t, real)
			diff := tb.counters(t).diff(before)
			if tt.counter != "" && !strings.Contains(diff, tt.counter+"+") {
				t.Errorf("counters changed by %q, want %s to rise", diff, tt.counter)
			}

			fixed, err := tb.d.Repair()
			if err != nil {
				t.Fatalf("Repair: %v", err)
			}
			if !hasFault(fixed, tt.fault) {
				t.Errorf("Repair() repaired %v, want a %s", fixed, tt.fault)
			}
			if n := tb.d.Repairs()[tt.fault]; n == 0 {
				t.Errorf("Repairs()[%s] = 0 after a repair", tt.fault)
			}
			if st := tb.d.Status(); !st.Ready() {
				t.Errorf("after Repair: %s", st)
			}
			client, err = dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
			if err != nil {
				t.Fatalf("pod dial after Repair: %v", err)
			}
			exchange(t, client, accept(t, tb.outbound))
			nothingAccepted(t, real)
		})
	}
}

func hasFault(ps []Problem, f Fault) bool {
	return slices.ContainsFunc(ps, func(p Problem) bool { return p.Fault == f })
}

// detachPinned detaches the link pinned at pin, as `bpftool link detach`
// does, leaving the pin in place.
func detachPinned(t testing.TB, pin string) {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Detach(); err != nil {
		t.Fatalf("detach %s: %v", pin, err)
	}
}

// TestWatchRepairs: with Watch running, a deleted rule (noticed through
// netlink) and a detached program (noticed by the periodic check) come
// back by themselves, and Watch ends with its context.
func TestWatchRepairs(t *testing.T) {
	tb := newTestbed(t, false)
	stop := tb.watch(t)
	for _, f := range []struct {
		fault   Fault
		breakIt func()
	}{
		{FaultRule, func() { _ = netlink.RuleDel(tb.d.rule(tb.d.settings())) }},
		{FaultAttachment, func() {
			detachPinned(t, filepath.Join(tb.cfg.PinDir, linksDir, attachKey{tb.podIf, rolePodIngress}.pinName()))
		}},
	} {
		before := tb.d.Repairs()[f.fault]
		f.breakIt()
		tb.waitRepaired(t, f.fault, before)
	}
	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("pod dial after the repairs: %v", err)
	}
	exchange(t, client, accept(t, tb.outbound))
	if err := stop(); err != nil {
		t.Errorf("Watch: %v", err)
	}
}

// watch runs Watch until the returned stop is called (or the test ends).
func (tb *testbed) watch(t testing.TB) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- tb.d.Watch(ctx, 0) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-errc })
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// waitRepaired waits until Watch has repaired fault once more than
// before and nothing is missing any more.
func (tb *testbed) waitRepaired(t testing.TB, fault Fault, before uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for tb.d.Repairs()[fault] == before || len(tb.d.Check()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s not repaired after 10 s: %v", fault, tb.d.Check())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkWatchRepair measures how long the data path goes without a
// piece of its kernel state while Watch runs: from the fault to the
// repair.
func BenchmarkWatchRepair(b *testing.B) {
	for _, f := range []struct {
		name    string
		fault   Fault
		breakIt func(tb *testbed)
	}{
		{"rule deleted (netlink)", FaultRule, func(tb *testbed) { _ = netlink.RuleDel(tb.d.rule(tb.d.settings())) }},
		{"pod_ingress detached (periodic check)", FaultAttachment, func(tb *testbed) {
			detachPinned(b, filepath.Join(tb.cfg.PinDir, linksDir, attachKey{tb.podIf, rolePodIngress}.pinName()))
		}},
	} {
		b.Run(f.name, func(b *testing.B) {
			tb := newTestbed(b, false)
			tb.watch(b)
			b.ResetTimer()
			for range b.N {
				before := tb.d.Repairs()[f.fault]
				f.breakIt(tb)
				tb.waitRepaired(b, f.fault, before)
			}
		})
	}
}

// BenchmarkCheck measures one check of the kernel state on a node with
// one pod and one uplink: everything (what Check and a netlink
// notification do), and what Watch looks at every DefaultWatchInterval
// in between (checkSilent: attachments, sk_lookup, pins).
func BenchmarkCheck(b *testing.B) {
	tb := newTestbed(b, false)
	for _, c := range []struct {
		name  string
		scope checkScope
	}{{"all", checkAll}, {"silent", checkSilent}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				tb.d.mu.Lock()
				ps := tb.d.checkLocked(c.scope)
				tb.d.mu.Unlock()
				if len(ps) > 0 {
					b.Fatal(ps)
				}
			}
		})
	}
}

// TestSilentCheckMakesNoGarbage: what Watch looks at four times a second
// allocates nothing when nothing is missing. An idle agent allocates
// little else, and what it allocates stays resident until a collection
// that an idle agent's heap may not need for minutes (issue 9: back
// within 10% of the idle size after 10,000 connections).
func TestSilentCheckMakesNoGarbage(t *testing.T) {
	tb := newTestbed(t, false)
	check := func() {
		tb.d.mu.Lock()
		ps := tb.d.checkLocked(checkSilent)
		tb.d.mu.Unlock()
		if len(ps) > 0 {
			t.Fatal(ps)
		}
	}
	check() // the buffers it keeps
	if n := testing.AllocsPerRun(100, check); n >= 1 {
		t.Errorf("a silent check of a node with a pod and an uplink allocates %.1f times, want none", n)
	}
}
