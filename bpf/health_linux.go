package bpf

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/mantlet/mantlet/internal/rawfs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// problem is a Problem with what Repair needs to mend it.
type problem struct {
	Problem
	key attachKey // FaultAttachment
}

// Check reports every piece of the data path's kernel state that is
// missing: the routing rule and route, lo, the sk_lookup link, the tc
// attachments and the pins. It changes nothing.
func (d *Datapath) Check() []Problem {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	var out []Problem
	for _, p := range d.checkLocked(checkAll) {
		out = append(out, p.Problem)
	}
	return out
}

// checkScope says what a check looks at.
type checkScope bool

const (
	// checkAll looks at everything.
	checkAll checkScope = true
	// checkSilent looks only at what changes without a netlink
	// notification: the sk_lookup link, the tc attachments, the pins.
	// Listing the routing rules, the routes and lo is most of a check's
	// cost (about 15 KB of garbage each time); Watch does it when a
	// notification says they changed, and every watchAllEvery.
	checkSilent checkScope = false
)

func (d *Datapath) checkLocked(scope checkScope) []problem {
	var out []problem
	add := func(f Fault, format string, args ...any) *problem {
		out = append(out, problem{Problem: Problem{Fault: f, Detail: fmt.Sprintf(format, args...)}})
		return &out[len(out)-1]
	}
	if scope == checkAll {
		s := d.settings()
		if lo, err := d.nl.LinkByName("lo"); err != nil {
			add(FaultLoopback, "lo: %v", err)
		} else if lo.Attrs().Flags&net.FlagUp == 0 {
			add(FaultLoopback, "lo is down in the node's namespace")
		}
		if ok, err := d.hasRule(s); err != nil {
			add(FaultRule, "list routing rules: %v", err)
		} else if !ok {
			add(FaultRule, "routing rule fwmark %#x/%#x lookup %d (priority %d) is missing", s.RedirectMark, s.MarkMask, s.RouteTable, s.RulePriority)
		}
		if ok, err := d.hasLocalRoute(s); err != nil {
			add(FaultRoute, "list routes of table %d: %v", s.RouteTable, err)
		} else if !ok {
			add(FaultRoute, "route local 0.0.0.0/0 dev lo table %d is missing", s.RouteTable)
		}
	}
	if !d.skLookupAttached() {
		add(FaultSkLookup, "the sk_lookup program is not attached to the node's network namespace")
	}
	d.checkKeys = d.appendAttachmentKeys(d.checkKeys[:0])
	for _, k := range d.checkKeys {
		if !d.alive(d.attached[k]) {
			add(FaultAttachment, "%s is not attached to %s", k.role, d.ifName(k.ifindex)).key = k
		}
	}
	for _, pin := range d.missingPins() {
		add(FaultPin, "pin %s is missing", pin)
	}
	return out
}

// missingPins lists the paths the data path pins (the directory, its links
// directory, the maps and the links) that are not there. Two directory
// reads, however many pods (lstat on bpffs is not cheap), into a buffer
// the data path keeps: it makes no garbage when nothing is missing.
func (d *Datapath) missingPins() []string {
	if d.pinPaths[0].IsZero() {
		d.pinPaths = [2]rawfs.Path{rawfs.NewPath(d.cfg.PinDir), rawfs.NewPath(filepath.Join(d.cfg.PinDir, linksDir))}
	}
	dir, links := d.pinPaths[0], d.pinPaths[1]
	s := &d.pinScan
	s.reset()
	maps := d.pinnedMapNames()
	for _, name := range maps {
		s.expect(name)
	}
	s.expect(linksDir)
	if err := s.scan(dir); err != nil {
		return []string{dir.String()}
	}
	var out []string
	for _, name := range maps {
		if !s.has(name) {
			out = append(out, filepath.Join(dir.String(), name))
		}
	}
	if !s.has(linksDir) {
		return append(out, links.String())
	}
	s.reset()
	if d.skLookup != nil {
		s.expect(skLookupPin)
	}
	for _, a := range d.attached {
		s.expect(filepath.Base(a.pin))
	}
	if err := s.scan(links); err != nil {
		return append(out, links.String())
	}
	if d.skLookup != nil && !s.has(skLookupPin) {
		out = append(out, filepath.Join(links.String(), skLookupPin))
	}
	for _, a := range d.attached {
		if !s.has(filepath.Base(a.pin)) {
			// Something is missing: list the lost pins in a stable order.
			for _, k := range d.attachmentKeys() {
				if pin := d.attached[k].pin; !s.has(filepath.Base(pin)) {
					out = append(out, pin)
				}
			}
			break
		}
	}
	return out
}

// Repair mends what Check reports: it installs the routing rule and route
// again (and sets lo up), attaches the sk_lookup program and the tc
// programs again, and pins again what lost its pin. An attachment whose
// interface is gone is forgotten instead. It returns what it repaired;
// the error names what it could not.
func (d *Datapath) Repair() ([]Problem, error) { return d.repair(checkAll) }

// repair is Repair of what scope looks at.
func (d *Datapath) repair(scope checkScope) ([]Problem, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return nil, err
	}
	probs := d.checkLocked(scope)
	if len(probs) == 0 {
		return nil, nil
	}
	var (
		errs    []error
		routing bool
		pins    bool
	)
	for _, p := range probs {
		switch p.Fault {
		case FaultLoopback, FaultRule, FaultRoute:
			routing = true
		case FaultSkLookup:
			errs = append(errs, d.reattachSkLookup())
		case FaultAttachment:
			errs = append(errs, d.reattach(p.key))
		case FaultPin:
			pins = true
		}
	}
	if routing {
		errs = append(errs, d.installRouting())
	}
	if pins {
		errs = append(errs, d.repin())
	}
	// What is still missing was not repaired.
	left := map[Problem]bool{}
	for _, p := range d.checkLocked(scope) {
		left[p.Problem] = true
		errs = append(errs, fmt.Errorf("bpf: repair: %s", p.Detail))
	}
	var fixed []Problem
	for _, p := range probs {
		if !left[p.Problem] {
			fixed = append(fixed, p.Problem)
		}
	}
	for _, p := range fixed {
		d.repairs[p.Fault]++
		d.log.Warn("repaired the data path", "fault", p.Fault, "what", p.Detail)
	}
	return fixed, errors.Join(errs...)
}

// Repairs returns how many repairs of each fault Repair made.
func (d *Datapath) Repairs() map[Fault]uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[Fault]uint64, len(d.repairs))
	for f, n := range d.repairs {
		out[f] = n
	}
	return out
}

// hasRule reports whether the capture rule of s is installed.
func (d *Datapath) hasRule(s mantletSettings) (bool, error) {
	want := d.rule(s)
	rules, err := d.nl.RuleListFiltered(netlink.FAMILY_V4, want, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PRIORITY|netlink.RT_FILTER_MARK|netlink.RT_FILTER_MASK)
	if err != nil {
		return false, err
	}
	return len(rules) > 0, nil
}

// hasLocalRoute reports whether the capture table holds `local 0.0.0.0/0
// dev lo`.
func (d *Datapath) hasLocalRoute(s mantletSettings) (bool, error) {
	routes, err := d.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: int(s.RouteTable)}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, err
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL && (r.Dst == nil || r.Dst.IP.IsUnspecified() && maskBits(r.Dst) == 0) {
			return true, nil
		}
	}
	return false, nil
}

func maskBits(n *net.IPNet) int {
	ones, _ := n.Mask.Size()
	return ones
}

// skLookupAttached reports whether our sk_lookup link is attached to the
// node's namespace.
func (d *Datapath) skLookupAttached() bool {
	if d.skLookup == nil {
		return false
	}
	typ, ino, err := d.linkInfo.target(d.skLookup)
	return err == nil && typ == link.NetNsType && uint64(ino) == d.nsInode
}

// reattachSkLookup replaces a detached sk_lookup link with a new one.
func (d *Datapath) reattachSkLookup() error {
	if d.skLookup != nil {
		_ = d.skLookup.Unpin()
		d.skLookup.Close()
		d.skLookup = nil
	}
	return d.setupSkLookup(d.cfg.PinDir)
}

// reattach attaches the program of k again, or forgets k when its
// interface is gone.
func (d *Datapath) reattach(k attachKey) error {
	if _, err := d.nl.LinkByIndex(k.ifindex); err != nil {
		d.log.Info("forgetting an attachment whose interface is gone", "ifindex", k.ifindex, "role", k.role)
		d.detach(k)
		if !d.hasAttachment(k.ifindex) {
			return d.forgetIface(k.ifindex)
		}
		return nil
	}
	return d.attach(k)
}

// attachmentKeys returns the keys of d.attached in a stable order.
func (d *Datapath) attachmentKeys() []attachKey {
	return d.appendAttachmentKeys(make([]attachKey, 0, len(d.attached)))
}

// appendAttachmentKeys appends the keys of the attachments to keys, in
// attachmentKeys' order.
func (d *Datapath) appendAttachmentKeys(keys []attachKey) []attachKey {
	start := len(keys)
	for k := range d.attached {
		keys = append(keys, k)
	}
	slices.SortFunc(keys[start:], func(a, b attachKey) int {
		if a.ifindex != b.ifindex {
			return a.ifindex - b.ifindex
		}
		return slices.Index(roles, a.role) - slices.Index(roles, b.role)
	})
	return keys
}

func (d *Datapath) ifName(ifindex int) string {
	if l, err := d.nl.LinkByIndex(ifindex); err == nil {
		return fmt.Sprintf("%s (ifindex %d)", l.Attrs().Name, ifindex)
	}
	return fmt.Sprintf("ifindex %d (gone)", ifindex)
}

// pinnedMaps returns the maps of the data path by their pin name.
// pinnedMapNames returns the names of pinnedMaps, sorted. The maps are
// fixed once loaded: the names are worked out once.
func (d *Datapath) pinnedMapNames() []string {
	if d.mapNames == nil {
		for name := range d.pinnedMaps() {
			d.mapNames = append(d.mapNames, name)
		}
		slices.Sort(d.mapNames)
	}
	return d.mapNames
}

func (d *Datapath) pinnedMaps() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(d.objs.mantletMaps)
	t := v.Type()
	for i := range t.NumField() {
		if m, ok := v.Field(i).Interface().(*ebpf.Map); ok && m != nil {
			out[t.Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

// repin creates the pin directory again if it is gone (taking its lock
// again) and pins every map and link that lost its pin.
func (d *Datapath) repin() error {
	dir := d.cfg.PinDir
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("bpf: recreate pin dir: %w", err)
		}
		lock, err := lockDir(dir)
		if err != nil {
			return err
		}
		if d.lock != nil {
			d.lock.Close()
		}
		d.lock = lock
	}
	if err := os.MkdirAll(filepath.Join(dir, linksDir), 0o700); err != nil {
		return fmt.Errorf("bpf: recreate pin dir: %w", err)
	}
	type pinner interface {
		Pin(string) error
		Unpin() error
	}
	pin := func(obj pinner, path string) error {
		if _, err := os.Lstat(path); err == nil {
			return nil
		}
		// Unpin first: the object remembers its last path and takes a
		// pin to the same path as done.
		if err := obj.Unpin(); err != nil {
			return fmt.Errorf("bpf: repin %s: %w", path, err)
		}
		if err := obj.Pin(path); err != nil {
			return fmt.Errorf("bpf: repin %s: %w", path, err)
		}
		return nil
	}
	var errs []error
	for name, m := range d.pinnedMaps() {
		errs = append(errs, pin(m, filepath.Join(dir, name)))
	}
	if d.skLookup != nil {
		errs = append(errs, pin(d.skLookup, filepath.Join(dir, linksDir, skLookupPin)))
	}
	for _, a := range d.attached {
		if a.link != nil {
			errs = append(errs, pin(a.link, a.pin))
		} else {
			errs = append(errs, pin(a.clsact, a.pin))
		}
	}
	return errors.Join(errs...)
}
