package ztunnel

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

// liveHeap is the live heap after a full collection.
func liveHeap() int64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// TestFlowRegistryGivesBackTheMemoryOf10000Flows: once 10,000 flows
// came and went the registry is back to (nearly) its size before them,
// and it still lists exactly the flows that are open.
func TestFlowRegistryGivesBackTheMemoryOf10000Flows(t *testing.T) {
	const n = 10_000
	flows := make([]*LiveFlow, n)
	for i := range flows {
		flows[i] = &LiveFlow{}
	}
	tab := newFlowTable(DefaultMaxFlows)
	before := liveHeap()
	for _, l := range flows {
		if !tab.add(l) {
			t.Fatal("the registry refused a flow below its limit")
		}
	}
	grown := liveHeap() - before
	for _, l := range flows[:n-3] {
		tab.remove(l)
	}
	var open []uint64
	tab.each(func(l *LiveFlow) bool { open = append(open, l.ID()); return true })
	if fmt.Sprint(len(open), tab.n.Load()) != "3 3" {
		t.Errorf("after 9,997 flows ended the registry lists %d flows and counts %d, want 3", len(open), tab.n.Load())
	}
	for _, l := range flows[n-3:] {
		tab.remove(l)
	}
	kept := liveHeap() - before
	t.Logf("registry of %d flows: %d KiB; after they ended: %d KiB", n, grown>>10, kept>>10)
	if kept > 64<<10 {
		t.Errorf("the registry keeps %d KiB after %d flows ended (%d KiB while open), want ≤ 64 KiB", kept>>10, n, grown>>10)
	}
	runtime.KeepAlive(flows)
	runtime.KeepAlive(tab)
}

// TestAdmissionGivesBackTheMemoryOf10000Sources: a flood from 10,000
// addresses, once its handshakes ended, leaves the table as it was, and
// the table admits and counts as before.
func TestAdmissionGivesBackTheMemoryOf10000Sources(t *testing.T) {
	const n = 10_000
	a := newAdmission(2*n, 4, true)
	now := time.Unix(0, 0)
	before := liveHeap()
	tickets := make([]*ticket, 0, n)
	for i := range n {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 1000)
		tk, _, why := a.admit(src, nil, now, false)
		if tk == nil {
			t.Fatalf("source %d refused (%v)", i, why)
		}
		tickets = append(tickets, tk)
	}
	for _, tk := range tickets {
		if !a.release(tk) {
			t.Fatal("a held ticket was not released")
		}
	}
	tickets = nil
	checkTable(t, a)
	kept := liveHeap() - before
	t.Logf("admission table after %d sources: %d KiB kept", n, kept>>10)
	if kept > 64<<10 {
		t.Errorf("the admission table keeps %d KiB after %d sources left, want ≤ 64 KiB", kept>>10, n)
	}
	if tk, _, _ := a.admit(ap("192.0.2.1:1"), nil, now, false); tk == nil || a.held() != 1 || a.sources() != 1 {
		t.Errorf("after the flood: ticket %v, %d held by %d sources; want 1 by 1", tk, a.held(), a.sources())
	}
	checkTable(t, a)
	runtime.KeepAlive(a)
}
