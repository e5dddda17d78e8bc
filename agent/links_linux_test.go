package agent

import (
	"errors"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/mantlet/mantlet/internal/privtest"
)

// inFreshNetns runs fn on a thread of its own inside a new, unnamed
// network namespace. The thread is never unlocked, so it dies with the
// goroutine and the namespace goes when nothing holds it any more.
func inFreshNetns(t *testing.T, fn func(h *netlink.Handle)) {
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

func TestRouteLinksFindsPodVethsOfARoutedCNI(t *testing.T) {
	privtest.Require(t)
	inFreshNetns(t, func(h *netlink.Handle) {
		must := func(what string, err error) {
			t.Helper()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		veth := func(name, peer string) netlink.Link {
			t.Helper()
			must("add veth "+name, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}))
			l, err := h.LinkByName(name)
			must("find "+name, err)
			p, err := h.LinkByName(peer)
			must("find "+peer, err)
			must("up", h.LinkSetUp(l))
			must("up", h.LinkSetUp(p))
			return l
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
		}{
			{"198.19.1.10", pod.Attrs().Index, ""},
			{"198.19.1.11", 0, "route to 198.19.1.11: " + ErrNotPodRoute.Error()},
			{"198.19.2.5", 0, "route to 198.19.2.5: " + ErrNotPodRoute.Error()},
			{"198.19.4.4", 0, "route to 198.19.4.4 goes through gateway 198.18.0.2: " + ErrNotPodRoute.Error()},
			{"198.19.3.10", 0, "route to 198.19.3.10 leaves through mt-br0, a bridge device: " + ErrNotPodRoute.Error()},
		} {
			got, err := rl.PodLink(netip.MustParseAddr(tc.ip))
			switch {
			case tc.wantErr == "" && (err != nil || got != tc.want):
				t.Errorf("PodLink(%s) = %d, %v; want %d", tc.ip, got, err, tc.want)
			case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr || !errors.Is(err, ErrNotPodRoute)):
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
