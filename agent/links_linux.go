package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteLinks finds a local pod's veth the way routed CNIs (Calico, Cilium
// with per-endpoint routes, kindnet, the testbed) wire pods: the node's
// main routing table holds a /32 route to each local pod's IP through the
// host side of the pod's veth.
type RouteLinks struct {
	nl *netlink.Handle
}

// NewRouteLinks returns a finder that reads the routes of the calling
// thread's network namespace (the node's, where the agent runs).
func NewRouteLinks() (*RouteLinks, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("agent: netlink: %w", err)
	}
	return &RouteLinks{nl: h}, nil
}

// Close releases the netlink handle.
func (r *RouteLinks) Close() { r.nl.Close() }

// PodLink returns the ifindex of the veth that the /32 route to ip goes
// through. Its errors wrap ErrNotPodRoute when there is no such route or
// it leads elsewhere.
func (r *RouteLinks) PodLink(ip netip.Addr) (int, error) {
	ip = ip.Unmap()
	bits := 32
	family := netlink.FAMILY_V4
	if ip.Is6() {
		bits, family = 128, netlink.FAMILY_V6
	}
	filter := &netlink.Route{
		Dst:   &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(bits, bits)},
		Table: unix.RT_TABLE_MAIN,
	}
	routes, err := r.nl.RouteListFiltered(family, filter, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	if err != nil {
		return 0, fmt.Errorf("route to %s: %w", ip, err)
	}
	routes = slices.DeleteFunc(routes, func(rt netlink.Route) bool { return rt.LinkIndex == 0 || len(rt.MultiPath) > 0 })
	if len(routes) == 0 {
		if br := r.bridgeFor(ip, family); br != "" {
			return 0, fmt.Errorf("route to %s leaves through %s, a bridge: %w", ip, br, ErrBridgedCNI)
		}
		return 0, fmt.Errorf("route to %s: %w", ip, ErrNotPodRoute)
	}
	rt := routes[0]
	if rt.Gw != nil {
		return 0, fmt.Errorf("route to %s goes through gateway %s: %w", ip, rt.Gw, ErrNotPodRoute)
	}
	link, err := r.nl.LinkByIndex(rt.LinkIndex)
	if err != nil {
		return 0, fmt.Errorf("route to %s: link %d: %w", ip, rt.LinkIndex, err)
	}
	if link.Type() == "bridge" {
		return 0, fmt.Errorf("route to %s leaves through %s, a bridge: %w", ip, link.Attrs().Name, ErrBridgedCNI)
	}
	if link.Type() != "veth" {
		return 0, fmt.Errorf("route to %s leaves through %s, a %s device: %w", ip, link.Attrs().Name, link.Type(), ErrNotPodRoute)
	}
	if m := link.Attrs().MasterIndex; m != 0 {
		if master, err := r.nl.LinkByIndex(m); err == nil && master.Type() == "bridge" {
			return 0, fmt.Errorf("route to %s leaves through %s, a port of bridge %s: %w", ip, link.Attrs().Name, master.Attrs().Name, ErrBridgedCNI)
		}
	}
	return rt.LinkIndex, nil
}

// bridgeFor returns the name of the bridge that the most specific
// directly connected route of the main table covering ip goes through
// (the subnet route of a bridge CNI, such as 10.244.1.0/24 dev cni0), or
// "" when that route is not through a bridge. Default routes and routes
// through a gateway are not a bridge CNI's and are ignored, so a node
// whose uplink is a bridge is not mistaken for one.
func (r *RouteLinks) bridgeFor(ip netip.Addr, family int) string {
	routes, err := r.nl.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return ""
	}
	best, bestBits := 0, -1
	for _, rt := range routes {
		if rt.Dst == nil || rt.Gw != nil || rt.LinkIndex == 0 || len(rt.MultiPath) > 0 {
			continue
		}
		bits, _ := rt.Dst.Mask.Size()
		if bits == 0 || bits <= bestBits || !rt.Dst.Contains(ip.AsSlice()) {
			continue
		}
		best, bestBits = rt.LinkIndex, bits
	}
	if best == 0 {
		return ""
	}
	link, err := r.nl.LinkByIndex(best)
	if err != nil || link.Type() != "bridge" {
		return ""
	}
	return link.Attrs().Name
}

// FindUplinks returns the names of the interfaces that hold one of the
// node's addresses, which lead to the other nodes; when none does, the
// interface of the default route.
func FindUplinks(nodeIPs []netip.Addr) ([]string, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("agent: find uplinks: netlink: %w", err)
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("agent: find uplinks: %w", err)
	}
	var names []string
	add := func(index int) error {
		l, err := h.LinkByIndex(index)
		if err != nil {
			return fmt.Errorf("agent: find uplinks: link %d: %w", index, err)
		}
		if n := l.Attrs().Name; n != "lo" && !slices.Contains(names, n) {
			names = append(names, n)
		}
		return nil
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if ok && slices.Contains(nodeIPs, ip.Unmap()) {
			if err := add(a.LinkIndex); err != nil {
				return nil, err
			}
		}
	}
	if len(names) > 0 {
		return names, nil
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("agent: find uplinks: %w", err)
	}
	for _, rt := range routes {
		if (rt.Dst == nil || rt.Dst.IP.IsUnspecified()) && rt.LinkIndex > 0 {
			if err := add(rt.LinkIndex); err != nil {
				return nil, err
			}
		}
	}
	if len(names) == 0 {
		return nil, errors.New("agent: find uplinks: no interface holds a node address and there is no default route; name the uplinks explicitly")
	}
	return names, nil
}
