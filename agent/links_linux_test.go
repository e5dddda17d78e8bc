package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/mantlet/mantlet/internal/privtest"
)

// inFreshNetns runs fn on a thread of its own inside a new, unnamed
// network namespace. The thread is never unlocked, so it dies with the
// goroutine and the namespace goes when nothing holds it any more.
func inFreshNetns(t testing.TB, fn func(h *netlink.Handle)) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		ns, err := netns.New()
		if err != nil {
			t.Errorf("new netns: %v", err)
			return
		}
		defer ns.Close()
		h, err := netlink.NewHandle()
		if err != nil {
			t.Errorf("netlink: %v", err)
			return
		}
		defer h.Close()
		fn(h)
	}()
	<-done
}

// mustFor returns a function that fails t with what and err when err is
// not nil.
func mustFor(t testing.TB) func(what string, err error) {
	return func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

// addVeth adds the veth pair name-peer to h's namespace, both ends up,
// and returns name's end.
func addVeth(t testing.TB, h *netlink.Handle, name, peer string) netlink.Link {
	t.Helper()
	must := mustFor(t)
	must("add veth "+name, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}))
	l, err := h.LinkByName(name)
	must("find "+name, err)
	p, err := h.LinkByName(peer)
	must("find "+peer, err)
	must("up", h.LinkSetUp(l))
	must("up", h.LinkSetUp(p))
	return l
}

func TestRouteLinksFindsPodVethsOfARoutedCNI(t *testing.T) {
	privtest.Require(t)
	inFreshNetns(t, func(h *netlink.Handle) {
		must := mustFor(t)
		veth := func(name, peer string) netlink.Link {
			t.Helper()
			return addVeth(t, h, name, peer)
		}
		route := func(r *netlink.Route) {
			t.Helper()
			must("add route "+r.String(), h.RouteAdd(r))
		}
		prefix := func(s string) *net.IPNet {
			_, n, err := net.ParseCIDR(s)
			must("cidr", err)
			return n
		}
		pod := veth("mt-h0", "mt-p0")
		up := veth("mt-u0", "mt-u1")
		addr, _ := netlink.ParseAddr("198.18.0.1/24")
		must("address", h.AddrAdd(up, addr))
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "mt-br0"}}
		must("bridge", h.LinkAdd(br))
		must("up", h.LinkSetUp(br))
		route(&netlink.Route{LinkIndex: pod.Attrs().Index, Dst: prefix("198.19.1.10/32"), Scope: netlink.SCOPE_LINK})
		route(&netlink.Route{LinkIndex: br.Attrs().Index, Dst: prefix("198.19.3.10/32"), Scope: netlink.SCOPE_LINK})
		route(&netlink.Route{LinkIndex: up.Attrs().Index, Dst: prefix("198.19.2.0/24"), Gw: net.ParseIP("198.18.0.2")})
		route(&netlink.Route{LinkIndex: up.Attrs().Index, Dst: prefix("198.19.4.4/32"), Gw: net.ParseIP("198.18.0.2")})
		route(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP("198.18.0.254")})

		rl, err := NewRouteLinks()
		must("NewRouteLinks", err)
		defer rl.Close()
		for _, tc := range []struct {
			ip      string
			want    int
			wantErr string
			errIs   error
		}{
			{"198.19.1.10", pod.Attrs().Index, "", nil},
			{"198.19.1.11", 0, "route to 198.19.1.11: " + ErrNotPodRoute.Error(), ErrNotPodRoute},
			{"198.19.2.5", 0, "route to 198.19.2.5: " + ErrNotPodRoute.Error(), ErrNotPodRoute},
			{"198.19.4.4", 0, "route to 198.19.4.4 goes through gateway 198.18.0.2: " + ErrNotPodRoute.Error(), ErrNotPodRoute},
			{"198.19.3.10", 0, "route to 198.19.3.10 leaves through mt-br0, a bridge: " + ErrBridgedCNI.Error(), ErrBridgedCNI},
		} {
			got, err := rl.PodLink(netip.MustParseAddr(tc.ip))
			switch {
			case tc.wantErr == "" && (err != nil || got != tc.want):
				t.Errorf("PodLink(%s) = %d, %v; want %d", tc.ip, got, err, tc.want)
			case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr || !errors.Is(err, tc.errIs)):
				t.Errorf("PodLink(%s) error = %v\nwant %s", tc.ip, err, tc.wantErr)
			}
		}

		for _, tc := range []struct {
			nodeIPs []netip.Addr
			want    []string
		}{
			{[]netip.Addr{netip.MustParseAddr("198.18.0.1")}, []string{"mt-u0"}},
			{nil, []string{"mt-u0"}}, // the default route's interface
		} {
			got, err := FindUplinks(tc.nodeIPs)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("FindUplinks(%v) = %v, %v; want %v", tc.nodeIPs, got, err, tc.want)
			}
		}
	})
}

func TestRouteLinksRefusesPodsOfABridgedCNI(t *testing.T) {
	privtest.Require(t)
	inFreshNetns(t, func(h *netlink.Handle) {
		must := mustFor(t)
		bridge := func(name, cidr string) netlink.Link {
			t.Helper()
			must("bridge "+name, h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}))
			l, err := h.LinkByName(name)
			must("find "+name, err)
			addr, err := netlink.ParseAddr(cidr)
			must("parse "+cidr, err)
			must("address", h.AddrAdd(l, addr))
			must("up", h.LinkSetUp(l))
			return l
		}
		// The bridge CNI's node: cni0 holds the gateway of the pod
		// subnet (a connected /24 route), pods' veths are its ports.
		cni0 := bridge("mt-cni0", "10.244.1.1/24")
		must("add veth", h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mt-h1", MasterIndex: cni0.Attrs().Index}, PeerName: "mt-p1"}))
		port, err := h.LinkByName("mt-h1")
		must("find mt-h1", err)
		must("up", h.LinkSetUp(port))
		// A veth that is a bridge port, with a /32 route of its own.
		_, host32, _ := net.ParseCIDR("10.244.1.50/32")
		must("route", h.RouteAdd(&netlink.Route{LinkIndex: port.Attrs().Index, Dst: host32, Scope: netlink.SCOPE_LINK}))
		// The node's uplink is a bridge too (a common host set-up): its
		// default route must not make every unknown address "bridged".
		up := bridge("mt-up", "192.0.2.10/24")
		must("default route", h.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP("192.0.2.1")}))

		rl, err := NewRouteLinks()
		must("NewRouteLinks", err)
		defer rl.Close()
		for _, tc := range []struct {
			ip, wantErr string
			errIs       error
		}{
			{"10.244.1.11", "route to 10.244.1.11 leaves through mt-cni0, a bridge: " + ErrBridgedCNI.Error(), ErrBridgedCNI},
			{"10.244.1.50", "route to 10.244.1.50 leaves through mt-h1, a port of bridge mt-cni0: " + ErrBridgedCNI.Error(), ErrBridgedCNI},
			{"10.244.7.7", "route to 10.244.7.7: " + ErrNotPodRoute.Error(), ErrNotPodRoute},
			{"192.0.2.77", "route to 192.0.2.77 leaves through mt-up, a bridge: " + ErrBridgedCNI.Error(), ErrBridgedCNI},
		} {
			_, err := rl.PodLink(netip.MustParseAddr(tc.ip))
			if err == nil || err.Error() != tc.wantErr || !errors.Is(err, tc.errIs) {
				t.Errorf("PodLink(%s) error = %v\nwant %s", tc.ip, err, tc.wantErr)
			}
		}
	})
}

// BenchmarkAgentIdleResyncRouteLinks is the idle pass of an agent with 10
// pods whose veths RouteLinks finds by their routes, in a network
// namespace of its own.
func BenchmarkAgentIdleResyncRouteLinks(b *testing.B) {
	privtest.Require(b)
	const pods = 10
	inFreshNetns(b, func(h *netlink.Handle) {
		must := mustFor(b)
		for i := 1; i <= pods; i++ {
			l := addVeth(b, h, fmt.Sprintf("mt-h%d", i), fmt.Sprintf("mt-p%d", i))
			dst := &net.IPNet{IP: net.IPv4(198, 19, 1, byte(i)), Mask: net.CIDRMask(32, 32)}
			must("add route", h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK}))
		}
		rl, err := NewRouteLinks()
		must("NewRouteLinks", err)
		defer rl.Close()
		benchIdleResync(b, rl, pods)
	})
}

// TestRouteLinksTellsWhenAPodVethMayHaveChanged: the version RouteLinks
// gives the agent changes when a pod's sandbox is made again (its veth
// deleted, a new one routed to its address), and PodLink then finds the
// new veth.
func TestRouteLinksTellsWhenAPodVethMayHaveChanged(t *testing.T) {
	privtest.Require(t)
	inFreshNetns(t, func(h *netlink.Handle) {
		must := mustFor(t)
		dst := &net.IPNet{IP: net.IPv4(198, 19, 1, 10), Mask: net.CIDRMask(32, 32)}
		sandbox := func(n int) int {
			t.Helper()
			host, peer := fmt.Sprintf("mt-h%d", n), fmt.Sprintf("mt-p%d", n)
			must("add veth "+host, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: peer}))
			l, err := h.LinkByName(host)
			must("find "+host, err)
			must("up", h.LinkSetUp(l))
			must("add route", h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK}))
			return l.Attrs().Index
		}
		first := sandbox(0)
		rl, err := NewRouteLinks()
		must("NewRouteLinks", err)
		defer rl.Close()
		v0, ok := rl.LinksVersion()
		if !ok {
			t.Fatal("RouteLinks cannot follow the node's changes")
		}
		if got, err := rl.PodLink(netip.MustParseAddr("198.19.1.10")); err != nil || got != first {
			t.Fatalf("PodLink = %d, %v; want %d", got, err, first)
		}
		old, err := h.LinkByIndex(first)
		must("find the old veth", err)
		must("delete the old veth", h.LinkDel(old))
		second := sandbox(1)
		deadline := time.Now().Add(5 * time.Second)
		for v, _ := rl.LinksVersion(); v == v0; v, _ = rl.LinksVersion() {
			if time.Now().After(deadline) {
				t.Fatal("the version did not change within 5s of the pod's veth being made again")
			}
			time.Sleep(time.Millisecond)
		}
		if got, err := rl.PodLink(netip.MustParseAddr("198.19.1.10")); err != nil || got != second {
			t.Fatalf("after the sandbox was made again, PodLink = %d, %v; want %d", got, err, second)
		}
	})
}
