package bpf

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func (d *Datapath) rule(s mantletSettings) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Mark = s.RedirectMark
	mask := s.MarkMask
	r.Mask = &mask
	r.Table = int(s.RouteTable)
	r.Priority = int(s.RulePriority)
	return r
}

func localRoute(loIndex int, table uint32) *netlink.Route {
	return &netlink.Route{
		LinkIndex: loIndex,
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Table:     int(table),
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Family:    netlink.FAMILY_V4,
	}
}

// installRouting creates `ip rule fwmark M/MASK lookup T` and `ip route
// add local 0.0.0.0/0 dev lo table T`: without them a marked SYN is
// forwarded instead of delivered to the ztunnel.
func (d *Datapath) installRouting() error {
	s := d.settings()
	lo, err := d.nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("bpf: find lo: %w", err)
	}
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := d.nl.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bpf: set lo up: %w", err)
		}
	}
	if err := d.nl.RouteReplace(localRoute(lo.Attrs().Index, s.RouteTable)); err != nil {
		return fmt.Errorf("bpf: add route local 0.0.0.0/0 dev lo table %d: %w", s.RouteTable, err)
	}
	if err := d.nl.RuleAdd(d.rule(s)); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("bpf: add rule fwmark %#x/%#x lookup %d: %w", s.RedirectMark, s.MarkMask, s.RouteTable, err)
	}
	return nil
}

// removeRouting removes what installRouting made for s; best effort.
func (d *Datapath) removeRouting(s mantletSettings) {
	if err := removeRouting(d.nl, s); err != nil {
		d.log.Warn("remove policy routing", "err", err)
	}
}

func removeRouting(nl *netlink.Handle, s mantletSettings) error {
	if s.RouteTable == 0 {
		return nil
	}
	var errs []error
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Mark = s.RedirectMark
	mask := s.MarkMask
	r.Mask = &mask
	r.Table = int(s.RouteTable)
	r.Priority = int(s.RulePriority)
	if err := nl.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("bpf: delete rule fwmark %#x/%#x lookup %d: %w", s.RedirectMark, s.MarkMask, s.RouteTable, err))
	}
	if lo, err := nl.LinkByName("lo"); err == nil {
		if err := nl.RouteDel(localRoute(lo.Attrs().Index, s.RouteTable)); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("bpf: delete route local 0.0.0.0/0 table %d: %w", s.RouteTable, err))
		}
	}
	return errors.Join(errs...)
}
