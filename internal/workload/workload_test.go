package workload

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

func testSnapshot(t *testing.T) *Snapshot {
	t.Helper()
	s, err := New(
		[]Node{{Name: "node-1", IP: ip("198.18.0.1")}, {Name: "node-2", IP: ip("198.18.0.2")}},
		[]Workload{
			{UID: "a", Name: "frontend-0", Namespace: "shop", ServiceAccount: "frontend", Node: "node-1", IPs: []netip.Addr{ip("198.19.1.10")}, Enrolled: true},
			{UID: "b", Name: "checkout-0", Namespace: "shop", ServiceAccount: "checkout", Node: "node-2", IPs: []netip.Addr{ip("198.19.2.10")}, Enrolled: true},
			{UID: "c", Name: "checkout-1", Namespace: "shop", ServiceAccount: "checkout", Node: "node-1", IPs: []netip.Addr{ip("198.19.1.11")}, Enrolled: true},
		},
		[]Service{{Name: "checkout", Namespace: "shop", VIPs: []netip.Addr{ip("198.18.128.5")},
			Ports: []ServicePort{{Port: 80, TargetPort: 8080}}, Endpoints: []string{"b", "c"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSnapshotLookups(t *testing.T) {
	s := testSnapshot(t)
	if w := s.WorkloadByIP(ip("198.19.2.10")); w == nil || w.Name != "checkout-0" {
		t.Fatalf("WorkloadByIP = %v", w)
	}
	if w := s.WorkloadByIP(ip("::ffff:198.19.2.10")); w == nil || w.Name != "checkout-0" {
		t.Fatalf("WorkloadByIP of a v4-mapped address = %v", w)
	}
	if w := s.WorkloadByIP(ip("198.19.9.9")); w != nil {
		t.Fatalf("unknown IP resolved to %v", w)
	}
	if n, ok := s.NodeByIP(ip("198.18.0.2")); !ok || n != "node-2" {
		t.Fatalf("NodeByIP = %q, %v", n, ok)
	}
	if got := len(s.LocalWorkloads("node-1")); got != 2 {
		t.Fatalf("node-1 has %d local workloads, want 2", got)
	}
	id, err := s.WorkloadByUID("a").ID(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil || id.String() != "spiffe://cluster.local/ns/shop/sa/frontend" {
		t.Fatalf("ID = %v, %v", id, err)
	}
}

func TestResolveServiceSpreadsOverEndpoints(t *testing.T) {
	s := testSnapshot(t)
	seen := map[netip.AddrPort]int{}
	for pick := range uint32(10) {
		svc, ep, w, ok := s.ResolveService(netip.MustParseAddrPort("198.18.128.5:80"), pick)
		if !ok || svc.Name != "checkout" || w == nil || ep.Port() != 8080 {
			t.Fatalf("ResolveService = %v %v %v %v", svc, ep, w, ok)
		}
		seen[ep]++
	}
	if len(seen) != 2 {
		t.Fatalf("endpoints used = %v, want both", seen)
	}
	if _, _, _, ok := s.ResolveService(netip.MustParseAddrPort("198.18.128.5:81"), 0); ok {
		t.Fatal("a port the service lacks resolved")
	}
}

func TestNewRejectsContradictions(t *testing.T) {
	w := Workload{UID: "a", Name: "x", Namespace: "n", IPs: []netip.Addr{ip("198.19.1.1")}}
	w2 := Workload{UID: "b", Name: "y", Namespace: "n", IPs: []netip.Addr{ip("198.19.1.1")}}
	for _, tc := range []struct {
		name string
		ws   []Workload
	}{
		{"duplicate IP", []Workload{w, w2}},
		{"duplicate UID", []Workload{w, {UID: "a", Name: "z", Namespace: "n", IPs: []netip.Addr{ip("198.19.1.2")}}}},
		{"no IP", []Workload{{UID: "a", Name: "x", Namespace: "n"}}},
	} {
		if _, err := New(nil, tc.ws, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", tc.name, err)
		}
	}
}

func TestStoreReplaceNotifiesAndStampsGeneration(t *testing.T) {
	st := NewStore()
	if st.Load() == nil || len(st.Load().Workloads()) != 0 {
		t.Fatal("new store does not hold an empty snapshot")
	}
	ch := st.Subscribe()
	s := testSnapshot(t)
	st.Replace(s)
	st.Replace(testSnapshot(t))
	<-ch
	if st.Load().Generation != 2 {
		t.Fatalf("generation = %d, want 2", st.Load().Generation)
	}
	select {
	case <-ch:
		t.Fatal("two replaces produced two wake-ups; they should coalesce")
	default:
	}
}
