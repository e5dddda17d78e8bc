package bpf

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type role string

const (
	rolePodIngress    role = "pod-ingress"
	rolePodEgress     role = "pod-egress"
	roleUplinkIngress role = "uplink-ingress"
	roleUplinkEgress  role = "uplink-egress"
)

var roles = []role{rolePodIngress, rolePodEgress, roleUplinkIngress, roleUplinkEgress}

// podRoles and uplinkRoles are the programs of an enrolled pod's veth and
// of an uplink.
var (
	podRoles    = []role{rolePodIngress, rolePodEgress}
	uplinkRoles = []role{roleUplinkIngress, roleUplinkEgress}
)

func (r role) ingress() bool { return r == rolePodIngress || r == roleUplinkIngress }

type attachKey struct {
	ifindex int
	role    role
}

func (k attachKey) pinName() string { return fmt.Sprintf("if%d-%s", k.ifindex, k.role) }

// parsePinName is the inverse of pinName (and of pinName+clsactSuffix).
func parsePinName(name string) (attachKey, bool, bool) {
	clsact := strings.HasSuffix(name, clsactSuffix)
	name = strings.TrimSuffix(name, clsactSuffix)
	rest, ok := strings.CutPrefix(name, "if")
	if !ok {
		return attachKey{}, false, false
	}
	num, r, ok := strings.Cut(rest, "-")
	if !ok {
		return attachKey{}, false, false
	}
	idx, err := strconv.Atoi(num)
	if err != nil || idx <= 0 || !slices.Contains(roles, role(r)) {
		return attachKey{}, false, false
	}
	return attachKey{idx, role(r)}, clsact, true
}

// attachment is a program attached to an interface: a TCX link, or a
// clsact filter where the kernel has no TCX.
type attachment struct {
	key    attachKey
	pin    string
	link   link.Link     // TCX
	clsact *ebpf.Program // clsact: the pinned program that marks the filter
}

// attachTCX is swapped by tests to exercise the clsact fallback.
var attachTCX = link.AttachTCX

// setupSkLookup adopts the pinned sk_lookup link (switching it to this
// binary's program) or attaches and pins a new one.
func (d *Datapath) setupSkLookup(dir string) error {
	pin := filepath.Join(dir, linksDir, skLookupPin)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		switch {
		case ierr == nil && info.NetNs() != nil && uint64(info.NetNs().NetnsInode) == d.nsInode:
			if err := l.Update(d.objs.NodeSkLookup); err != nil {
				l.Close()
				return fmt.Errorf("bpf: update the pinned sk_lookup link: %w", err)
			}
			d.skLookup = l
			return nil
		case ierr == nil && info.NetNs() != nil && info.NetNs().NetnsInode != 0:
			l.Close()
			return fmt.Errorf("bpf: %s belongs to another network namespace (inode %d, this one is %d): use one pin dir per node", dir, info.NetNs().NetnsInode, d.nsInode)
		}
		// The namespace it was attached to is gone.
		_ = l.Unpin()
		l.Close()
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("bpf: load the pinned sk_lookup link: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, linksDir), 0o700); err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	l, err := link.AttachNetNs(int(d.ns), d.objs.NodeSkLookup)
	if err != nil {
		return fmt.Errorf("bpf: attach sk_lookup to the node's network namespace: %w", err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return fmt.Errorf("bpf: pin the sk_lookup link: %w", err)
	}
	d.skLookup = l
	return nil
}

// adoptAttachments takes over the links pinned by a previous agent,
// switching them to this binary's programs. Attachments whose interface
// is gone are unpinned, with their map entries.
func (d *Datapath) adoptAttachments(dir string) error {
	entries, err := os.ReadDir(filepath.Join(dir, linksDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("bpf: %w", err)
	}
	for _, e := range entries {
		key, clsact, ok := parsePinName(e.Name())
		if !ok {
			continue
		}
		pin := filepath.Join(dir, linksDir, e.Name())
		a := &attachment{key: key, pin: pin}
		if clsact {
			a.clsact, err = ebpf.LoadPinnedProgram(pin, nil)
		} else {
			a.link, err = link.LoadPinnedLink(pin, nil)
		}
		if err != nil {
			return fmt.Errorf("bpf: load pinned %s: %w", pin, err)
		}
		if !d.alive(a) {
			d.log.Info("dropping a pinned attachment whose interface is gone", "ifindex", key.ifindex, "role", key.role)
			d.drop(a)
			continue
		}
		if err := d.update(a); err != nil {
			d.release1(a)
			return err
		}
		d.attached[key] = a
	}
	// Interfaces in the map without any attachment (a crash between
	// filling the maps and attaching) are forgotten.
	var (
		idx   uint32
		info  mantletIfaceInfo
		stale []int
	)
	it := d.objs.Ifaces.Iterate()
	for it.Next(&idx, &info) {
		if !d.hasAttachment(int(idx)) {
			stale = append(stale, int(idx))
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("bpf: iterate interfaces: %w", err)
	}
	for _, i := range stale {
		if err := d.forgetIface(i); err != nil {
			return err
		}
	}
	return nil
}

func (d *Datapath) hasAttachment(ifindex int) bool {
	for k := range d.attached {
		if k.ifindex == ifindex {
			return true
		}
	}
	return false
}

func (d *Datapath) program(r role) *ebpf.Program {
	switch r {
	case rolePodIngress:
		return d.objs.PodIngress
	case rolePodEgress:
		return d.objs.PodEgress
	case roleUplinkEgress:
		return d.objs.UplinkEgress
	default:
		return d.objs.UplinkIngress
	}
}

func clsactParent(r role) uint32 {
	if r.ingress() {
		return netlink.HANDLE_MIN_INGRESS
	}
	return netlink.HANDLE_MIN_EGRESS
}

// Our clsact filters: one per direction and interface, at a fixed
// priority and handle so that replacing is idempotent.
const (
	clsactPriority = 0xc001
	clsactHandle   = 0x1
)

func clsactFilter(k attachKey, fd int) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: k.ifindex,
			Parent:    clsactParent(k.role),
			Handle:    clsactHandle,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           fd,
		Name:         "mantlet-" + string(k.role),
		DirectAction: true,
	}
}

// alive reports whether a's program is still attached to its interface.
func (d *Datapath) alive(a *attachment) bool {
	if a.link != nil {
		typ, ifindex, err := d.linkInfo.target(a.link)
		return err == nil && typ == link.TCXType && int(ifindex) == a.key.ifindex
	}
	l, err := d.nl.LinkByIndex(a.key.ifindex)
	if err != nil {
		return false
	}
	filters, err := d.nl.FilterList(l, clsactParent(a.key.role))
	if err != nil {
		return false
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Priority == clsactPriority && bf.Name == "mantlet-"+string(a.key.role) {
			return true
		}
	}
	return false
}

// update switches an attachment to this binary's program.
func (d *Datapath) update(a *attachment) error {
	prog := d.program(a.key.role)
	if a.link != nil {
		if err := a.link.Update(prog); err != nil {
			return fmt.Errorf("bpf: update %s on ifindex %d: %w", a.key.role, a.key.ifindex, err)
		}
		return nil
	}
	if err := d.nl.FilterReplace(clsactFilter(a.key, prog.FD())); err != nil {
		return fmt.Errorf("bpf: replace the clsact filter %s on ifindex %d: %w", a.key.role, a.key.ifindex, err)
	}
	// Re-pin the marker with the new program.
	_ = os.Remove(a.pin)
	a.clsact.Close()
	clone, err := prog.Clone()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	a.clsact = clone
	if err := clone.Pin(a.pin); err != nil {
		return fmt.Errorf("bpf: pin %s: %w", a.pin, err)
	}
	return nil
}

// attach attaches the program for k, unless it is attached already.
func (d *Datapath) attach(k attachKey) error {
	if a := d.attached[k]; a != nil {
		if d.alive(a) {
			return nil
		}
		d.drop(a)
		delete(d.attached, k)
	}
	pin := filepath.Join(d.cfg.PinDir, linksDir, k.pinName())
	prog := d.program(k.role)
	at := ebpf.AttachTCXIngress
	if !k.role.ingress() {
		at = ebpf.AttachTCXEgress
	}
	var l link.Link
	err := d.inNS(func() error {
		var err error
		l, err = attachTCX(link.TCXOptions{Interface: k.ifindex, Program: prog, Attach: at})
		return err
	})
	if err == nil {
		if err := l.Pin(pin); err != nil {
			_ = l.Close()
			return fmt.Errorf("bpf: pin %s: %w", pin, err)
		}
		d.attached[k] = &attachment{key: k, pin: pin, link: l}
		d.log.Info("attached", "ifindex", k.ifindex, "role", k.role, "via", "tcx")
		return nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("bpf: attach %s to ifindex %d: %w", k.role, k.ifindex, err)
	}
	// No TCX (Linux < 6.6): a clsact qdisc and a direct-action filter.
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: k.ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := d.nl.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("bpf: add a clsact qdisc to ifindex %d (no TCX on this kernel): %w", k.ifindex, err)
	}
	if err := d.nl.FilterReplace(clsactFilter(k, prog.FD())); err != nil {
		return fmt.Errorf("bpf: attach %s to ifindex %d with clsact: %w", k.role, k.ifindex, err)
	}
	clone, err := prog.Clone()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	if err := clone.Pin(pin + clsactSuffix); err != nil {
		clone.Close()
		_ = d.nl.FilterDel(clsactFilter(k, 0))
		return fmt.Errorf("bpf: pin %s: %w", pin+clsactSuffix, err)
	}
	d.attached[k] = &attachment{key: k, pin: pin + clsactSuffix, clsact: clone}
	d.log.Info("attached", "ifindex", k.ifindex, "role", k.role, "via", "clsact")
	return nil
}

// detach detaches and unpins the attachment for k, if any.
func (d *Datapath) detach(k attachKey) {
	if a := d.attached[k]; a != nil {
		d.drop(a)
		delete(d.attached, k)
	}
}

// drop detaches a, unpins it and releases its handle.
func (d *Datapath) drop(a *attachment) {
	if a.link != nil {
		if err := a.link.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) {
			d.log.Debug("detach link", "pin", a.pin, "err", err)
		}
	} else if err := d.nl.FilterDel(clsactFilter(a.key, 0)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		d.log.Debug("delete clsact filter", "pin", a.pin, "err", err)
	}
	if err := os.Remove(a.pin); err != nil && !errors.Is(err, fs.ErrNotExist) {
		d.log.Warn("unpin", "pin", a.pin, "err", err)
	}
	d.release1(a)
}

func (d *Datapath) release1(a *attachment) {
	if a.link != nil {
		a.link.Close()
	}
	if a.clsact != nil {
		a.clsact.Close()
	}
}
