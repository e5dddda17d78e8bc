package bpf

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func (d *Datapath) rule(s mantletSettings) *netlink.Rule { return ruleOf(s) }

// ruleOf is the capture rule of s: fwmark RedirectMark/MarkMask lookup
// RouteTable, at RulePriority.
func ruleOf(s mantletSettings) *netlink.Rule {
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

// removeRouting removes what installRouting made for s, unless another
// data path pinned next to this one uses the same rule in this namespace;
// best effort.
func (d *Datapath) removeRouting(s mantletSettings) {
	for _, o := range siblings(d.cfg.PinDir, true) {
		if o.nsInode == d.nsInode && o.settings.sameRouting(s) {
			d.log.Info("keeping the routing rule: another data path in this namespace uses it", "pin_dir", o.dir)
			return
		}
	}
	if _, _, err := removeRouting(d.nl, s); err != nil {
		d.log.Warn("remove policy routing", "err", err)
	}
}

// removeRouting deletes the rule and the route of s and says for each
// whether it was "removed" or "not found".
func removeRouting(nl *netlink.Handle, s mantletSettings) (rule, route string, err error) {
	if s.RouteTable == 0 {
		return "not found", "not found", nil
	}
	var errs []error
	rule, route = "removed", "not found"
	if err := nl.RuleDel(ruleOf(s)); errors.Is(err, unix.ENOENT) {
		rule = "not found"
	} else if err != nil {
		rule = "not removed"
		errs = append(errs, fmt.Errorf("bpf: delete rule fwmark %#x/%#x lookup %d: %w", s.RedirectMark, s.MarkMask, s.RouteTable, err))
	}
	if lo, err := nl.LinkByName("lo"); err == nil {
		switch err := nl.RouteDel(localRoute(lo.Attrs().Index, s.RouteTable)); {
		case err == nil:
			route = "removed"
		case !errors.Is(err, unix.ESRCH):
			route = "not removed"
			errs = append(errs, fmt.Errorf("bpf: delete route local 0.0.0.0/0 table %d: %w", s.RouteTable, err))
		}
	}
	return rule, route, errors.Join(errs...)
}
