//go:build linux

package testbed

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// controlPlane joins the control plane's namespace to the bridge the way
// uplink joins a node (the veth is made in the underlay namespace, its peer
// born in the control plane's), and routes every node's pod CIDR via that
// node, so that pods reach it too.
func (b *builder) controlPlane(cp *ControlPlane, br *netlink.Bridge) error {
	if err := b.step("control plane"); err != nil {
		return err
	}
	ul, ns := b.handles[b.tb.underlay], b.handles[cp.NS]
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: controlPlanePort, MasterIndex: br.Index},
		PeerName:      cp.Uplink,
		PeerNamespace: netlink.NsFd(ns.ns),
	}
	if err := ul.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("testbed: control plane: create uplink: %w", err)
	}
	if err := ul.nl.LinkSetUp(veth); err != nil {
		return fmt.Errorf("testbed: control plane: bring up bridge port: %w", err)
	}
	up, err := ns.nl.LinkByName(cp.Uplink)
	if err != nil {
		return fmt.Errorf("testbed: control plane: find uplink: %w", err)
	}
	addr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(cp.IP, NodeCIDR.Bits()))}
	if err := ns.nl.AddrAdd(up, addr); err != nil {
		return fmt.Errorf("testbed: control plane: address uplink: %w", err)
	}
	if err := ns.nl.LinkSetUp(up); err != nil {
		return fmt.Errorf("testbed: control plane: bring up uplink: %w", err)
	}
	for _, n := range b.tb.nodes {
		r := &netlink.Route{LinkIndex: up.Attrs().Index, Dst: ipNet(n.PodCIDR), Gw: n.IP.AsSlice()}
		if err := ns.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("testbed: control plane: route to %s via %s: %w", n.PodCIDR, n.IP, err)
		}
	}
	return nil
}
