package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteLinks finds a local pod's veth the way routed CNIs (Calico, Cilium
// with per-endpoint routes, kindnet, the testbed) wire pods: the node's
// main routing table holds a /32 route to each local pod's IP through the
// host side of the pod's veth.
//
// It also follows the node's link and route changes (rtnetlink
// notifications), so that LinksVersion tells the agent when PodLink's
// answers may have changed: a resync then looks up the pods' veths again
// only if one may have, and an idle node's agent lists no routes.
type RouteLinks struct {
	nl *netlink.Handle

	changes  *os.File      // rtnetlink socket in the link and route groups, in the runtime's poller
	version  atomic.Uint64 // bumped for every notification read, and when some were lost
	watching atomic.Bool   // changes is read: version means something
	done     chan struct{} // closed when the reader has returned
}

// changeGroups are the rtnetlink groups whose notifications may change
// PodLink's answers: links (added, removed, made a bridge port) and routes.
const changeGroups = unix.RTMGRP_LINK | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE

// NewRouteLinks returns a finder that reads the routes of the calling
// thread's network namespace (the node's, where the agent runs).
func NewRouteLinks() (*RouteLinks, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("agent: netlink: %w", err)
	}
	r := &RouteLinks{nl: h, done: make(chan struct{})}
	// Without notifications, every resync looks up every pod's veth, as
	// LinksVersion then says.
	if r.changes, err = subscribe(changeGroups); err != nil {
		close(r.done)
		return r, nil
	}
	r.watching.Store(true)
	go r.follow()
	return r, nil
}

// subscribe opens a non-blocking rtnetlink socket that receives the
// notifications of groups.
func subscribe(groups uint32) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("agent: rtnetlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("agent: rtnetlink: join groups %#x: %w", groups, err)
	}
	return os.NewFile(uintptr(fd), "rtnetlink"), nil
}

// follow reads notifications until Close: each one, read whole or not,
// and each overflow of the socket (notifications lost), bumps the
// version. It reads into one buffer and parses nothing, so an agent pays
// nothing for the node's changes beyond the system calls.
func (r *RouteLinks) follow() {
	defer close(r.done)
	var buf [4096]byte
	for {
		_, err := r.changes.Read(buf[:])
		switch {
		case err == nil, errors.Is(err, unix.ENOBUFS):
			r.version.Add(1)
		case errors.Is(err, os.ErrClosed):
			return
		default:
			// Changes can no longer be told: back to looking up every
			// pod at every resync.
			r.watching.Store(false)
			r.version.Add(1)
			return
		}
	}
}

// LinksVersion returns a number that changes whenever a link or route of
// the node changes, so whenever PodLink's answers may; ok is false when
// the changes cannot be followed (the socket could not be opened, or
// reading it failed).
func (r *RouteLinks) LinksVersion() (version uint64, ok bool) {
	// The version is read first: a failure of the reader after it is
	// seen at the next call.
	v := r.version.Load()
	return v, r.watching.Load()
}

// Close releases the netlink handle and stops following changes.
func (r *RouteLinks) Close() {
	if r.changes != nil {
		r.changes.Close()
	}
	<-r.done
	r.nl.Close()
}

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
