package bpf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"github.com/cilium/ebpf/link"
	"github.com/mantlet/mantlet/internal/rawfs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Datapath is the loaded and attached data path of one node. Its methods
// are safe for concurrent use.
type Datapath struct {
	cfg  Config
	log  *slog.Logger
	ns   netns.NsHandle
	nl   *netlink.Handle
	lock *os.File
	objs mantletObjects

	// routeCheck: the kernel lets the tc programs confirm local delivery
	// (settingsRouteCheck).
	routeCheck bool

	// nsInode identifies the node's network namespace.
	nsInode uint64
	// created: Open made the pins (it did not adopt them).
	created bool

	mu       sync.Mutex
	repairs  map[Fault]uint64
	closed   bool
	skLookup link.Link
	attached map[attachKey]*attachment

	// What checks reuse (under mu), so that the silent check makes no
	// garbage (scan_linux.go).
	checkKeys []attachKey
	mapNames  []string // of the pinned maps, sorted; fixed once loaded
	pinScan   nameScan
	pinPaths  [2]rawfs.Path // the pin directory and its links directory
	linkInfo  linkInfo
}

// Open loads the data path for cfg, or adopts the one pinned in
// cfg.PinDir by a previous agent (maps keep their contents, links stay in
// place and get the programs of this binary). It attaches the sk_lookup
// program to the network namespace of the calling thread (the node's),
// installs the policy routing rule and route, sets net.ipv4.ip_forward,
// and mounts the bpf filesystem on /sys/fs/bpf when it is missing.
//
// The pin directory stays locked until Close: a second Open on it fails
// with ErrLocked. A kernel that lacks a needed feature yields an error
// wrapping ebpf.ErrNotSupported that names the feature.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Datapath, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := checkKernel(); err != nil {
		return nil, err
	}
	routeCheck, err := fibLookupTakesMark()
	if err != nil {
		return nil, err
	}
	if !routeCheck {
		log.Warn("bpf: this kernel's bpf_fib_lookup takes no mark (Linux < 6.10): captured connections are not checked for local delivery before steering; a missing routing rule still fails closed (the kernel does not forward a packet that carries a socket) but the drops are not counted")
	}
	if cfg.CaptureLocalPlain {
		cfg.CaptureLocalPlain = localPlainPossible(log)
	}
	if err := ensureBPFFS(cfg.PinDir); err != nil {
		return nil, err
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("bpf: open the current network namespace: %w", err)
	}
	d := &Datapath{cfg: cfg, log: log, ns: ns, routeCheck: routeCheck, attached: map[attachKey]*attachment{}, repairs: map[Fault]uint64{}}
	if d.nsInode, err = nsInode(ns); err != nil {
		ns.Close()
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			d.release()
		}
	}()
	if d.nl, err = netlink.NewHandleAt(ns); err != nil {
		return nil, fmt.Errorf("bpf: netlink: %w", err)
	}

	unlock, err := lockParent(ctx, cfg.PinDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	for _, o := range siblings(cfg.PinDir, true) {
		if o.nsInode != d.nsInode {
			continue
		}
		if o.live {
			return nil, fmt.Errorf("%w: its pin dir is %s (this one's would be %s)", ErrNamespaceInUse, o.dir, cfg.PinDir)
		}
		log.Warn("a stale data path of another pin dir is attached to this network namespace; remove it with 'mantlet agent --cleanup --pin-dir "+o.dir+"' run in this namespace", "pin_dir", o.dir)
	}

	if _, err := os.Stat(cfg.PinDir); err == nil {
		if d.lock, err = lockDir(cfg.PinDir); err != nil {
			return nil, err
		}
		if err := d.load(cfg.PinDir); err != nil {
			return nil, err
		}
		if err := d.setup(cfg.PinDir); err != nil {
			return nil, err
		}
		log.Info("adopted pinned eBPF data path", "pin_dir", cfg.PinDir, "pods", len(d.enrolledLocked()), "attachments", len(d.attached))
		ok = true
		return d, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("bpf: %w", err)
	}

	// A fresh node: build everything in a staging directory and move it
	// into place at the end, so a failure leaves no half-made pin dir.
	removeStaleStages(cfg.PinDir, log)
	stage, err := os.MkdirTemp(filepath.Dir(cfg.PinDir), stagePrefix+filepath.Base(cfg.PinDir)+"-")
	if err != nil {
		return nil, fmt.Errorf("bpf: create staging pin dir: %w", err)
	}
	staged := true
	defer func() {
		if staged {
			_ = os.RemoveAll(stage)
		}
	}()
	if err := os.Mkdir(filepath.Join(stage, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("bpf: %w", err)
	}
	if d.lock, err = lockDir(stage); err != nil {
		return nil, err
	}
	if err := d.load(stage); err != nil {
		return nil, err
	}
	if err := d.setup(stage); err != nil {
		d.removeRouting(d.settings())
		return nil, err
	}
	if err := os.Rename(stage, cfg.PinDir); err != nil {
		d.removeRouting(d.settings())
		return nil, fmt.Errorf("bpf: move staged pins into %s: %w", cfg.PinDir, err)
	}
	staged = false
	d.created = true
	log.Info("loaded eBPF data path", "pin_dir", cfg.PinDir)
	ok = true
	return d, nil
}

// setup brings the state in dir in line with the configuration: settings,
// node addresses, exclusions, routing, the sk_lookup link and the
// attachments that were pinned before.
func (d *Datapath) setup(dir string) error {
	var old mantletSettings
	if err := d.objs.Config.Lookup(uint32(0), &old); err != nil {
		return fmt.Errorf("bpf: read settings: %w", err)
	}
	cur := d.settings()
	if err := d.objs.Config.Put(uint32(0), cur); err != nil {
		return fmt.Errorf("bpf: write settings: %w", err)
	}
	if err := d.syncExclusions(); err != nil {
		return err
	}
	if err := d.inNS(func() error {
		// Written only when off: an unprivileged container (the chart's
		// DaemonSet) sees /proc/sys read-only, and Kubernetes nodes
		// forward already.
		const forward = "/proc/sys/net/ipv4/ip_forward"
		if b, err := os.ReadFile(forward); err == nil && strings.TrimSpace(string(b)) == "1" {
			return nil
		}
		return os.WriteFile(forward, []byte("1\n"), 0o644)
	}); err != nil {
		return fmt.Errorf("bpf: enable net.ipv4.ip_forward: %w", err)
	}
	if old.RouteTable != 0 && (old.RouteTable != cur.RouteTable || old.RulePriority != cur.RulePriority ||
		old.RedirectMark != cur.RedirectMark || old.MarkMask != cur.MarkMask) {
		d.log.Info("routing configuration changed: removing the old rule and route", "table", old.RouteTable, "priority", old.RulePriority)
		d.removeRouting(old)
	}
	if err := d.installRouting(); err != nil {
		return err
	}
	if err := d.setupSkLookup(dir); err != nil {
		return err
	}
	return d.adoptAttachments(dir)
}

// inNS runs fn on a thread in the node's network namespace: attaching by
// ifindex resolves the ifindex in the caller's namespace.
func (d *Datapath) inNS(fn func() error) error {
	runtime.LockOSThread()
	cur, err := netns.Get()
	if err == nil && cur.Equal(d.ns) {
		cur.Close()
		defer runtime.UnlockOSThread()
		return fn()
	}
	if err == nil {
		cur.Close()
	}
	runtime.UnlockOSThread()

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("bpf: open the thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(d.ns); err != nil {
			errc <- fmt.Errorf("bpf: enter the node's network namespace: %w", err)
			return // the thread stays locked and is thrown away
		}
		ferr := fn()
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

func (d *Datapath) resolve(ifindex int, name string) (netlink.Link, error) {
	if ifindex > 0 {
		l, err := d.nl.LinkByIndex(ifindex)
		if err != nil {
			return nil, fmt.Errorf("bpf: no interface with ifindex %d: %w", ifindex, err)
		}
		return l, nil
	}
	if name == "" {
		return nil, errors.New("bpf: neither an ifindex nor an interface name given")
	}
	l, err := d.nl.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("bpf: no interface named %q: %w", name, err)
	}
	return l, nil
}

func (d *Datapath) checkOpen() error {
	if d.closed {
		return errors.New("bpf: data path is closed")
	}
	return nil
}

// Status reports what is attached and which listeners are in place.
func (d *Datapath) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	var s Status
	if d.closed {
		return s
	}
	s.SkLookupAttached = d.skLookupAttached()
	for _, p := range d.checkLocked(checkAll) {
		if p.Fault != FaultSkLookup { // reported by SkLookupAttached
			s.Problems = append(s.Problems, p.Problem)
		}
	}
	for _, slot := range Slots() {
		var cookie uint64
		if err := d.objs.Listeners.Lookup(uint32(slot), &cookie); err == nil {
			s.Listeners = append(s.Listeners, slot)
		}
	}
	s.Pods = d.withRole(rolePodIngress)
	s.Uplinks = d.withRole(roleUplinkIngress)
	return s
}

// EnrolledPods returns the ifindexes of the enrolled pod veths (Status's
// Pods) without checking the kernel state.
func (d *Datapath) EnrolledPods() []int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	return d.withRole(rolePodIngress)
}

// Ready reports whether captured connections reach the ztunnel: nothing
// of the data path's kernel state is missing and the Outbound and HBONE
// slots hold listeners.
func (d *Datapath) Ready() bool { return d.Status().Ready() }

// Close releases the data path's handles and its lock on the pin
// directory. It leaves programs attached and maps pinned, so traffic keeps
// flowing until the next Open adopts them (or Cleanup removes them).
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.release()
	return nil
}

// Created reports whether Open made the data path rather than adopting
// one pinned by an earlier agent.
func (d *Datapath) Created() bool { return d.created }

// Remove undoes the data path and closes it: it detaches every program,
// removes the routing rule and route (unless another data path of the
// namespace uses them) and the pins, as Cleanup does. An agent whose
// start fails after Open calls it when Open created the data path
// (Created), so that a failed start leaves nothing behind.
func (d *Datapath) Remove(ctx context.Context) (CleanupReport, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return CleanupReport{PinDir: d.cfg.PinDir}, errors.New("bpf: remove: data path is closed")
	}
	d.closed = true
	unlock, err := lockParent(ctx, d.cfg.PinDir)
	if err != nil {
		d.release()
		return CleanupReport{PinDir: d.cfg.PinDir}, err
	}
	defer unlock()
	lock, nl := d.lock, d.nl
	d.lock, d.nl = nil, nil // kept until the pins are gone
	d.release()
	defer func() {
		nl.Close()
		if lock != nil {
			lock.Close()
		}
	}()
	return cleanupLocked(nl, d.nsInode, d.cfg.PinDir)
}

func (d *Datapath) release() {
	for _, a := range d.attached {
		d.release1(a)
	}
	d.attached = map[attachKey]*attachment{}
	if d.skLookup != nil {
		d.skLookup.Close()
		d.skLookup = nil
	}
	_ = d.objs.Close()
	if d.nl != nil {
		d.nl.Close()
	}
	if d.ns.IsOpen() {
		d.ns.Close()
	}
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
}
