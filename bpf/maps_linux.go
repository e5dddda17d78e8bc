package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

func (d *Datapath) settings() mantletSettings {
	s := mantletSettings{
		RedirectMark: d.cfg.RedirectMark,
		MarkMask:     d.cfg.MarkMask,
		ZtunnelMark:  d.cfg.ZtunnelMark,
		RouteTable:   uint32(d.cfg.RouteTable),
		RulePriority: uint32(d.cfg.RulePriority),
		PassMark:     d.cfg.PassMark,
	}
	if d.routeCheck {
		s.Flags |= settingsRouteCheck
	}
	if d.cfg.CaptureInboundPlain {
		s.Flags |= settingsInboundPlain
	}
	if d.cfg.CaptureLocalPlain {
		s.Flags |= settingsInboundPlainLocal
	}
	return s
}

// The CFG_F_* flags of mantlet.h.
const (
	settingsInboundPlain      = 1 << 0
	settingsInboundPlainLocal = 1 << 1
	settingsRouteCheck        = 1 << 2
)

// iface_info.flags: IFACE_F_STRICT of mantlet.h.
const ifaceStrict = 1 << 0

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
	sum := reflect.ValueOf(&c).Elem()
	for _, p := range per {
		cpu := reflect.ValueOf(p)
		for i := range sum.NumField() {
			// Field 0 of the generated struct is its layout marker.
			f := sum.Field(i)
			f.SetUint(f.Uint() + cpu.Field(i+1).Uint())
		}
	}
	return c, nil
}
