package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/cilium/ebpf"
)

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
	for _, r := range podRoles {
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
	for _, r := range podRoles {
		d.detach(attachKey{ifindex, r})
	}
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

// AttachUplink attaches the uplink programs to ifname, an interface that
// leads to other nodes: capture of HBONE (ingress) and the guard that
// drops enrolled pods' packets no mantlet program checked (egress).
// Attaching again only attaches what is missing.
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
	for _, r := range uplinkRoles {
		if err := d.attach(attachKey{idx, r}); err != nil {
			for _, r := range uplinkRoles {
				d.detach(attachKey{idx, r})
			}
			_ = d.forgetIface(idx)
			return fmt.Errorf("bpf: attach uplink %s: %w", ifname, err)
		}
	}
	return nil
}

// DetachUplink detaches the uplink programs from ifname.
func (d *Datapath) DetachUplink(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	idx, err := d.uplinkIndex("detach uplink", ifname)
	if err != nil {
		return err
	}
	for _, r := range uplinkRoles {
		d.detach(attachKey{idx, r})
	}
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
