package bpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Layout of a pin directory:
//
//	<PinDir>/<map>                  every map of mantlet.c, pinned by name
//	<PinDir>/links/sk_lookup        the sk_lookup link of the node's netns
//	<PinDir>/links/if<N>-<role>     a TCX link on ifindex N
//	<PinDir>/links/if<N>-<role>-tc  the program of a clsact filter on N
//	                                (fallback when the kernel has no TCX)
//
// bpffs refuses names with a dot.
const (
	linksDir     = "links"
	skLookupPin  = "sk_lookup"
	clsactSuffix = "-tc"
	stagePrefix  = "_stage_"
	configMapPin = "config"
)

type role string

const (
	rolePodIngress    role = "pod-ingress"
	rolePodEgress     role = "pod-egress"
	roleUplinkIngress role = "uplink-ingress"
)

var roles = []role{rolePodIngress, rolePodEgress, roleUplinkIngress}

func (r role) ingress() bool { return r != rolePodEgress }

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

// Datapath is the loaded and attached data path of one node. Its methods
// are safe for concurrent use.
type Datapath struct {
	cfg  Config
	log  *slog.Logger
	ns   netns.NsHandle
	nl   *netlink.Handle
	lock *os.File
	objs mantletObjects

	mu       sync.Mutex
	closed   bool
	skLookup link.Link
	attached map[attachKey]*attachment
}

// attachTCX is swapped by tests to exercise the clsact fallback.
var attachTCX = link.AttachTCX

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
	d := &Datapath{cfg: cfg, log: log, ns: ns, attached: map[attachKey]*attachment{}}
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
	log.Info("loaded eBPF data path", "pin_dir", cfg.PinDir)
	ok = true
	return d, nil
}

// checkKernel names the first kernel feature the data path needs and the
// kernel lacks.
func checkKernel() error {
	checks := []struct {
		feature string
		probe   func() error
	}{
		{"sk_lookup programs (Linux 5.9)", func() error { return features.HaveProgramType(ebpf.SkLookup) }},
		{"SOCKMAP maps", func() error { return features.HaveMapType(ebpf.SockMap) }},
		{"LPM trie maps", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
		{"bpf_skc_lookup_tcp in tc programs (Linux 5.2)", func() error { return features.HaveProgramHelper(ebpf.SchedCLS, asm.FnSkcLookupTcp) }},
		{"bpf_sk_assign in tc programs (Linux 5.7)", func() error { return features.HaveProgramHelper(ebpf.SchedCLS, asm.FnSkAssign) }},
		{"bpf_sk_assign in sk_lookup programs (Linux 5.9)", func() error { return features.HaveProgramHelper(ebpf.SkLookup, asm.FnSkAssign) }},
	}
	for _, c := range checks {
		if err := c.probe(); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return fmt.Errorf("bpf: the kernel lacks %s: %w", c.feature, err)
			}
			return fmt.Errorf("bpf: probe the kernel for %s: %w", c.feature, err)
		}
	}
	return nil
}

// ensureBPFFS checks that dir will live on a bpf filesystem, mounting one
// on /sys/fs/bpf if dir is below it and nothing is mounted there.
func ensureBPFFS(dir string) error {
	probe := dir
	for {
		if _, err := os.Stat(probe); err == nil {
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			break
		}
		probe = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(probe, &st); err != nil {
		return fmt.Errorf("bpf: statfs %s: %w", probe, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	const root = "/sys/fs/bpf"
	if probe != root || !strings.HasPrefix(dir, root+"/") {
		return fmt.Errorf("bpf: pin directory %s is not on a bpf filesystem (mount one: mount -t bpf bpf %s)", dir, root)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpf: mount the bpf filesystem on %s: %w", root, err)
	}
	return nil
}

// lockParent serialises the creation and removal of pin directories under
// one parent; it is held only for the duration of Open or Cleanup.
func lockParent(ctx context.Context, pinDir string) (func(), error) {
	parent := filepath.Dir(pinDir)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return nil, fmt.Errorf("bpf: create %s: %w", parent, err)
	}
	f, err := os.Open(parent)
	if err != nil {
		return nil, fmt.Errorf("bpf: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("bpf: lock %s: %w", parent, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("bpf: wait for the lock on %s: %w", parent, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// lockDir takes the exclusive lock of a pin directory without waiting.
// The lock belongs to the directory's inode, so it survives the rename of
// a staging directory.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("bpf: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, dir)
		}
		return nil, fmt.Errorf("bpf: lock %s: %w", dir, err)
	}
	return f, nil
}

// removeStaleStages removes staging directories that a crashed Open left
// behind. The caller holds the parent lock.
func removeStaleStages(pinDir string, log *slog.Logger) {
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(pinDir), stagePrefix+filepath.Base(pinDir)+"-*"))
	for _, s := range stale {
		f, err := lockDir(s)
		if err != nil {
			continue
		}
		if err := os.RemoveAll(s); err != nil {
			log.Warn("remove stale staging pin dir", "dir", s, "err", err)
		}
		f.Close()
	}
}

// load loads the programs and the maps pinned in dir, creating the maps
// that are not there yet.
func (d *Datapath) load(dir string) error {
	spec, err := loadMantlet()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("bpf: the maps pinned in %s were made by an incompatible version of mantlet; remove them with the agent's cleanup: %w", dir, err)
	}
	if err != nil {
		return fmt.Errorf("bpf: load the eBPF objects: %w", err)
	}
	return nil
}

func (d *Datapath) settings() mantletSettings {
	s := mantletSettings{
		RedirectMark: d.cfg.RedirectMark,
		MarkMask:     d.cfg.MarkMask,
		ZtunnelMark:  d.cfg.ZtunnelMark,
		RouteTable:   uint32(d.cfg.RouteTable),
		RulePriority: uint32(d.cfg.RulePriority),
	}
	if d.cfg.CaptureInboundPlain {
		s.Flags |= settingsInboundPlain
	}
	if d.cfg.CaptureLocalPlain {
		s.Flags |= settingsInboundPlainLocal
	}
	return s
}

// settingsInboundPlain and settingsInboundPlainLocal are
// CFG_F_INBOUND_PLAIN and CFG_F_INBOUND_PLAIN_LOCAL of mantlet.h.
const (
	settingsInboundPlain      = 1 << 0
	settingsInboundPlainLocal = 1 << 1
)

// localPlainPossible prepares the namespace for CaptureLocalPlain and
// reports whether it can work. Packets turned around into lo must pass
// the reverse path filter there, and TCP early demux must be off: it
// would attach the ztunnel's socket to the client's later packets as
// they arrive from the client's veth, and forwarding drops a packet that
// carries a socket before pod_egress can turn it around.
func localPlainPossible(log *slog.Logger) bool {
	if strictRPFilter() {
		log.Warn("bpf: plaintext from unmeshed pods of this node is not captured: strict rp_filter on lo would drop it (set net.ipv4.conf.all.rp_filter and net.ipv4.conf.lo.rp_filter to 0 or 2)")
		return false
	}
	const demux = "/proc/sys/net/ipv4/tcp_early_demux"
	if b, err := os.ReadFile(demux); err == nil && strings.TrimSpace(string(b)) == "0" {
		return true
	}
	if err := os.WriteFile(demux, []byte("0\n"), 0o644); err != nil {
		log.Warn("bpf: plaintext from unmeshed pods of this node is not captured: cannot turn TCP early demux off", "error", err)
		return false
	}
	log.Info("bpf: net.ipv4.tcp_early_demux set to 0 for the capture of plaintext from unmeshed pods of this node")
	return true
}

// strictRPFilter reports whether strict reverse path filtering applies to
// packets arriving on lo in the current network namespace: the kernel
// uses the larger of the "all" and the device's rp_filter.
func strictRPFilter() bool {
	v := 0
	for _, dev := range []string{"all", "lo"} {
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/rp_filter")
		if err != nil {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			v = max(v, n)
		}
	}
	return v == 1
}

// iface_info.flags: IFACE_F_STRICT of mantlet.h.
const ifaceStrict = 1 << 0

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
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
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

// syncExclusions makes node_ips, excl_cidrs and excl_ports hold exactly
// what the configuration says.
func (d *Datapath) syncExclusions() error {
	nodeIPs := map[uint32]bool{}
	for _, a := range ipv4Only(d.cfg.NodeIPs) {
		nodeIPs[addrKey(a)] = true
	}
	if err := syncSet(d.objs.NodeIps, nodeIPs); err != nil {
		return fmt.Errorf("bpf: node addresses: %w", err)
	}
	cidrs := map[mantletLpmV4Key]bool{}
	for _, p := range d.cfg.ExcludeCIDRs {
		if p.Addr().Unmap().Is4() {
			bits := p.Bits()
			if p.Addr().Is4In6() {
				bits -= 96
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), max(bits, 0)).Masked()
			cidrs[mantletLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: addrKey(p.Addr())}] = true
		}
	}
	if err := syncSet(d.objs.ExclCidrs, cidrs); err != nil {
		return fmt.Errorf("bpf: excluded CIDRs: %w", err)
	}
	ports := map[uint16]bool{}
	for _, p := range d.cfg.ExcludePorts {
		ports[p] = true
	}
	if err := syncSet(d.objs.ExclPorts, ports); err != nil {
		return fmt.Errorf("bpf: excluded ports: %w", err)
	}
	return nil
}

// syncSet makes the keys of m (values: one byte) equal to want.
func syncSet[K comparable](m *ebpf.Map, want map[K]bool) error {
	var (
		k     K
		v     uint8
		stale []K
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	for k := range want {
		if err := m.Put(k, uint8(1)); err != nil {
			return err
		}
	}
	return nil
}

// addrKey is an IPv4 address as the programs see it: network byte order
// in memory.
func addrKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

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

// setupSkLookup adopts the pinned sk_lookup link (switching it to this
// binary's program) or attaches and pins a new one.
func (d *Datapath) setupSkLookup(dir string) error {
	pin := filepath.Join(dir, linksDir, skLookupPin)
	var st unix.Stat_t
	if err := unix.Fstat(int(d.ns), &st); err != nil {
		return fmt.Errorf("bpf: stat the network namespace: %w", err)
	}
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		switch {
		case ierr == nil && info.NetNs() != nil && uint64(info.NetNs().NetnsInode) == st.Ino:
			if err := l.Update(d.objs.NodeSkLookup); err != nil {
				l.Close()
				return fmt.Errorf("bpf: update the pinned sk_lookup link: %w", err)
			}
			d.skLookup = l
			return nil
		case ierr == nil && info.NetNs() != nil && info.NetNs().NetnsInode != 0:
			l.Close()
			return fmt.Errorf("bpf: %s belongs to another network namespace (inode %d, this one is %d): use one pin dir per node", dir, info.NetNs().NetnsInode, st.Ino)
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
		info, err := a.link.Info()
		return err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == a.key.ifindex
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

// EnrollPod starts capturing the pod's traffic: it fills the maps (the
// pod's addresses for anti-spoofing and as local pods for the uplink
// program, STRICT) and attaches the tc programs to the host side of its
// veth. Enrolling again updates addresses and STRICT; it never attaches
// twice.
func (d *Datapath) EnrollPod(p Pod) error {
	ips := ipv4Only(p.IPs)
	if len(ips) == 0 {
		return fmt.Errorf("bpf: enroll pod on %s: no IPv4 address (IPv6 is not supported yet)", ifDesc(p.HostIfindex, p.HostIfName))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return err
	}
	l, err := d.resolve(p.HostIfindex, p.HostIfName)
	if err != nil {
		return fmt.Errorf("bpf: enroll pod: %w", err)
	}
	idx := l.Attrs().Index
	var info mantletIfaceInfo
	if err := d.objs.Ifaces.Lookup(uint32(idx), &info); err == nil && info.Kind == mantletIfaceKindIFACE_UPLINK {
		return fmt.Errorf("bpf: enroll pod: %s (ifindex %d) is an uplink", l.Attrs().Name, idx)
	}
	_, wasEnrolled := d.attached[attachKey{idx, rolePodIngress}]

	// Maps first, so the program never sees the pod's traffic without
	// knowing its addresses.
	want := map[mantletPodIpKey]bool{}
	for _, a := range ips {
		want[mantletPodIpKey{Ifindex: uint32(idx), Addr: addrKey(a)}] = true
	}
	if err := d.syncPodIPs(idx, want); err != nil {
		return err
	}
	info = mantletIfaceInfo{Kind: mantletIfaceKindIFACE_POD}
	if p.Strict {
		info.Flags |= ifaceStrict
	}
	if err := d.objs.Ifaces.Put(uint32(idx), info); err != nil {
		return fmt.Errorf("bpf: enroll pod on ifindex %d: %w", idx, err)
	}
	for _, r := range []role{rolePodIngress, rolePodEgress} {
		if err := d.attach(attachKey{idx, r}); err != nil {
			if !wasEnrolled {
				d.unenrollLocked(idx)
			}
			return fmt.Errorf("bpf: enroll pod on %s: %w", l.Attrs().Name, err)
		}
	}
	d.log.Debug("enrolled pod", "ifindex", idx, "ifname", l.Attrs().Name, "ips", ips, "strict", p.Strict)
	return nil
}

func ifDesc(idx int, name string) string {
	if idx > 0 {
		return "ifindex " + strconv.Itoa(idx)
	}
	return strconv.Quote(name)
}

// syncPodIPs makes the entries of ifindex in pod_ips equal to want, and
// keeps local_pods (the uplink program's view) in step.
func (d *Datapath) syncPodIPs(ifindex int, want map[mantletPodIpKey]bool) error {
	var (
		k     mantletPodIpKey
		v     uint8
		stale []mantletPodIpKey
	)
	it := d.objs.PodIps.Iterate()
	for it.Next(&k, &v) {
		if int(k.Ifindex) == ifindex && !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("bpf: iterate pod addresses: %w", err)
	}
	for _, k := range stale {
		if err := d.objs.PodIps.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: delete pod address: %w", err)
		}
		if err := d.objs.LocalPods.Delete(k.Addr); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: delete local pod address: %w", err)
		}
	}
	for k := range want {
		if err := d.objs.PodIps.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("bpf: add pod address: %w", err)
		}
		if err := d.objs.LocalPods.Put(k.Addr, uint8(1)); err != nil {
			return fmt.Errorf("bpf: add local pod address: %w", err)
		}
	}
	return nil
}

// forgetIface deletes the map entries of an interface.
func (d *Datapath) forgetIface(ifindex int) error {
	if err := d.syncPodIPs(ifindex, nil); err != nil {
		return err
	}
	if err := d.objs.Ifaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: forget ifindex %d: %w", ifindex, err)
	}
	return nil
}

// UnenrollPod detaches the programs from the pod's veth and forgets its
// addresses. Unenrolling a pod that is not enrolled is not an error.
func (d *Datapath) UnenrollPod(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return err
	}
	return d.unenrollLocked(ifindex)
}

func (d *Datapath) unenrollLocked(ifindex int) error {
	var info mantletIfaceInfo
	if err := d.objs.Ifaces.Lookup(uint32(ifindex), &info); err == nil && info.Kind == mantletIfaceKindIFACE_UPLINK {
		return fmt.Errorf("bpf: unenroll pod: ifindex %d is an uplink", ifindex)
	}
	d.detach(attachKey{ifindex, rolePodIngress})
	d.detach(attachKey{ifindex, rolePodEgress})
	return d.forgetIface(ifindex)
}

// SetLocalPod tells the uplink program whether ip belongs to a local
// enrolled pod (HBONE to it is captured). EnrollPod and UnenrollPod keep
// the enrolled pods' addresses in step already; this is for addresses
// managed otherwise.
func (d *Datapath) SetLocalPod(ip netip.Addr, on bool) error {
	ip = ip.Unmap()
	if !ip.Is4() {
		return fmt.Errorf("bpf: local pod %s: only IPv4 is supported for now", ip)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return err
	}
	if on {
		if err := d.objs.LocalPods.Put(addrKey(ip), uint8(1)); err != nil {
			return fmt.Errorf("bpf: add local pod %s: %w", ip, err)
		}
		return nil
	}
	if err := d.objs.LocalPods.Delete(addrKey(ip)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: remove local pod %s: %w", ip, err)
	}
	return nil
}

// AttachUplink attaches the uplink program to ifname, an interface that
// leads to other nodes. Attaching again is a no-op.
func (d *Datapath) AttachUplink(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	idx, err := d.uplinkIndex("attach uplink", ifname)
	if err != nil {
		return err
	}
	var info mantletIfaceInfo
	if err := d.objs.Ifaces.Lookup(uint32(idx), &info); err == nil && info.Kind == mantletIfaceKindIFACE_POD {
		return fmt.Errorf("bpf: attach uplink: %s (ifindex %d) is an enrolled pod's veth", ifname, idx)
	}
	if err := d.objs.Ifaces.Put(uint32(idx), mantletIfaceInfo{Kind: mantletIfaceKindIFACE_UPLINK}); err != nil {
		return fmt.Errorf("bpf: attach uplink %s: %w", ifname, err)
	}
	if err := d.attach(attachKey{idx, roleUplinkIngress}); err != nil {
		_ = d.forgetIface(idx)
		return fmt.Errorf("bpf: attach uplink %s: %w", ifname, err)
	}
	return nil
}

// DetachUplink detaches the uplink program from ifname.
func (d *Datapath) DetachUplink(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	idx, err := d.uplinkIndex("detach uplink", ifname)
	if err != nil {
		return err
	}
	d.detach(attachKey{idx, roleUplinkIngress})
	return d.forgetIface(idx)
}

// uplinkIndex returns the ifindex of the uplink ifname for op ("attach
// uplink", "detach uplink"), which prefixes the error. d.mu must be held.
func (d *Datapath) uplinkIndex(op, ifname string) (int, error) {
	if err := d.checkOpen(); err != nil {
		return 0, err
	}
	l, err := d.resolve(0, ifname)
	if err != nil {
		return 0, fmt.Errorf("bpf: %s: %w", op, err)
	}
	return l.Attrs().Index, nil
}

// Enrolled returns the ifindexes of the pods' veths that have programs
// attached, adopted ones included, in ascending order.
func (d *Datapath) Enrolled() []int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.enrolledLocked()
}

func (d *Datapath) enrolledLocked() []int { return d.withRole(rolePodIngress) }

func (d *Datapath) withRole(r role) []int {
	var out []int
	for k := range d.attached {
		if k.role == r {
			out = append(out, k.ifindex)
		}
	}
	slices.Sort(out)
	return out
}

// SetListener puts the ztunnel's listening socket l into slot. l must be a
// listening TCP socket without MPTCP (Go listens with MPTCP by default:
// use ListenConfig). The kernel drops it from the slot when it closes.
func (d *Datapath) SetListener(slot Slot, l syscall.Conn) error {
	if slot >= numSlots {
		return fmt.Errorf("bpf: set listener: no %s", slot)
	}
	rc, err := l.SyscallConn()
	if err != nil {
		return fmt.Errorf("bpf: set %s listener: %w", slot, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return err
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		proto, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil {
			uerr = err
			return
		}
		if proto == unix.IPPROTO_MPTCP {
			uerr = errors.New("the socket uses MPTCP, which cannot enter a SOCKMAP (listen with ListenConfig.SetMultipathTCP(false))")
			return
		}
		if proto != unix.IPPROTO_TCP {
			uerr = fmt.Errorf("not a TCP socket (protocol %d)", proto)
			return
		}
		if acc, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
			uerr = errors.New("the socket is not listening")
			return
		}
		uerr = d.objs.Listeners.Update(uint32(slot), uint64(fd), ebpf.UpdateAny)
	}); err != nil {
		return fmt.Errorf("bpf: set %s listener: %w", slot, err)
	}
	if uerr != nil {
		return fmt.Errorf("bpf: set %s listener: %w", slot, uerr)
	}
	return nil
}

// ClearListener empties slot: connections captured for it are dropped
// until a listener is set again.
func (d *Datapath) ClearListener(slot Slot) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return err
	}
	if err := d.objs.Listeners.Delete(uint32(slot)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: clear %s listener: %w", slot, err)
	}
	return nil
}

// Counters returns the counters summed over CPUs.
func (d *Datapath) Counters() (Counters, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkOpen(); err != nil {
		return Counters{}, err
	}
	return readCounters(d.objs.Counters)
}

func readCounters(m *ebpf.Map) (Counters, error) {
	var per []mantletCounterSet
	if err := m.Lookup(uint32(0), &per); err != nil {
		return Counters{}, fmt.Errorf("bpf: read counters: %w", err)
	}
	var c Counters
	for _, p := range per {
		c.Redirected += p.Redirected
		c.UplinkRedirected += p.UplinkRedirected
		c.Assigned += p.Assigned
		c.AssignFailed += p.AssignFailed
		c.SpoofDrops += p.SpoofDrops
		c.StrictDrops += p.StrictDrops
		c.NoListener += p.NoListener
		c.Excluded += p.Excluded
		c.LookupOutbound += p.LookupOutbound
		c.LookupInboundPlain += p.LookupInboundPlain
		c.LookupHBONE += p.LookupHbone
		c.LookupFailed += p.LookupFailed
		c.LocalPlainRedirected += p.LocalPlainRedirected
	}
	return c, nil
}

// Status reports what is attached and which listeners are in place.
func (d *Datapath) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	var s Status
	if d.closed {
		return s
	}
	if d.skLookup != nil {
		info, err := d.skLookup.Info()
		s.SkLookupAttached = err == nil && info.NetNs() != nil && info.NetNs().NetnsInode != 0
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

// Ready reports whether captured connections reach the ztunnel: the
// sk_lookup program is attached and the Outbound and HBONE slots hold
// listeners.
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

// Cleanup removes the data path pinned in pinDir: it detaches every
// program (pods, uplinks, sk_lookup), removes the policy routing rule and
// route from the calling thread's network namespace (which must be the
// node's), and removes the pins. A missing pinDir is not an error. It
// fails with ErrLocked while an agent holds the pin directory.
// net.ipv4.ip_forward is left on.
func Cleanup(ctx context.Context, pinDir string) error {
	if pinDir == "" || !filepath.IsAbs(pinDir) {
		return fmt.Errorf("bpf: cleanup: pin dir %q must be an absolute path", pinDir)
	}
	if _, err := os.Stat(pinDir); errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("bpf: cleanup: %w", err)
	}
	unlock, err := lockParent(ctx, pinDir)
	if err != nil {
		return err
	}
	defer unlock()
	lock, err := lockDir(pinDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	nl, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("bpf: cleanup: netlink: %w", err)
	}
	defer nl.Close()

	var errs []error
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: cleanup: %w", err))
	}
	for _, e := range entries {
		pin := filepath.Join(pinDir, linksDir, e.Name())
		if key, clsact, ok := parsePinName(e.Name()); ok && clsact {
			if err := nl.FilterDel(clsactFilter(key, 0)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("bpf: cleanup: delete the clsact filter %s on ifindex %d: %w", key.role, key.ifindex, err))
			}
			continue
		}
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("bpf: cleanup: load %s: %w", pin, err))
			continue
		}
		if err := l.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) {
			errs = append(errs, fmt.Errorf("bpf: cleanup: detach %s: %w", pin, err))
		}
		l.Close()
	}
	if m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, configMapPin), nil); err == nil {
		var s mantletSettings
		if err := m.Lookup(uint32(0), &s); err == nil {
			if err := removeRouting(nl, s); err != nil {
				errs = append(errs, err)
			}
		}
		m.Close()
	} else if !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: cleanup: read the routing settings: %w", err))
	}
	if err := os.RemoveAll(pinDir); err != nil {
		errs = append(errs, fmt.Errorf("bpf: cleanup: remove pins: %w", err))
	}
	return errors.Join(errs...)
}
