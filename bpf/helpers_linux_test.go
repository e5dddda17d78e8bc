package bpf

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/mantlet/mantlet/internal/privtest"
)

// testPinRoot holds the pin directories of tests, one per test; one root
// per test process, so that two runs on a machine never remove each
// other's.
var testPinRoot = fmt.Sprintf("/sys/fs/bpf/mantlet-test-%d", os.Getpid())

// newNS creates a network namespace with lo up, without entering it. It
// is destroyed when the test ends (once nothing else holds it).
func newNS(t testing.TB) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get netns: %v", err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	lo, lerr := netlink.LinkByName("lo")
	if lerr == nil {
		lerr = netlink.LinkSetUp(lo)
	}
	if err := netns.Set(orig); err != nil {
		// This thread is now in the wrong namespace: keep it locked so
		// that it dies with the goroutine.
		runtime.LockOSThread()
		t.Fatalf("return to the original netns: %v", err)
	}
	if lerr != nil {
		ns.Close()
		t.Fatalf("set lo up: %v", lerr)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// enter moves the calling goroutine, locked to its thread, into ns until
// the test ends.
func enter(t testing.TB, ns netns.NsHandle) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get netns: %v", err)
	}
	if err := netns.Set(ns); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("enter netns: %v", err)
	}
	t.Cleanup(func() {
		defer orig.Close()
		if err := netns.Set(orig); err != nil {
			t.Errorf("leave netns: %v", err) // the thread stays locked and dies
			return
		}
		runtime.UnlockOSThread()
	})
}

// inNS runs fn on a thread inside ns.
func inNS(t testing.TB, ns netns.NsHandle, fn func()) {
	t.Helper()
	done := make(chan struct{})
	var ferr error
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ferr = err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			ferr = err
			return
		}
		fn()
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
	}()
	<-done
	if ferr != nil {
		t.Fatalf("enter netns: %v", ferr)
	}
	if t.Failed() {
		t.FailNow() // fn failed on its own goroutine
	}
}

// testPinDir returns a fresh pin directory for the test and removes
// whatever is left in it when the test ends (Cleanup runs in the namespace
// the test had entered, so routing goes too).
func testPinDir(t testing.TB) string {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, t.Name())
	name = name[:min(len(name), 100)]
	dir := filepath.Join(testPinRoot, name+"-"+hex.EncodeToString(b[:]))
	t.Cleanup(func() {
		if _, err := Cleanup(context.Background(), dir); err != nil {
			t.Errorf("Cleanup(%s): %v", dir, err)
		}
		_ = os.RemoveAll(dir)
		_ = os.Remove(testPinRoot) // only when empty
	})
	return dir
}

// testConfig is the configuration tests use.
func testConfig(t testing.TB) Config {
	cfg := DefaultConfig("x")
	cfg.PinDir = testPinDir(t)
	cfg.NodeIPs = []netip.Addr{nodeIP}
	cfg.ExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}
	cfg.ExcludePorts = []uint16{22}
	return cfg
}

// Addresses of the tests (RFC 2544 benchmarking range, as the testbed).
var (
	nodeIP     = netip.MustParseAddr("198.18.0.1")
	podIP      = netip.MustParseAddr("198.19.1.10")
	otherPodIP = netip.MustParseAddr("198.19.1.11")
	remotePod  = netip.MustParseAddr("198.19.2.10")
	excludedIP = netip.MustParseAddr("203.0.113.7")
)

// addVeth creates a veth pair in the current thread's namespace, both
// ends up, and returns the ifindex of the first end. With peerNS set, the
// peer moves there.
func addVeth(t testing.TB, name, peer string, peerNS *netns.NsHandle) int {
	t.Helper()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}
	if peerNS != nil {
		v.PeerNamespace = netlink.NsFd(int(*peerNS))
	}
	if err := netlink.LinkAdd(v); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("veth %s: %v", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatalf("set %s up: %v", name, err)
	}
	if peerNS == nil {
		p, err := netlink.LinkByName(peer)
		if err != nil {
			t.Fatalf("veth %s: %v", peer, err)
		}
		if err := netlink.LinkSetUp(p); err != nil {
			t.Fatalf("set %s up: %v", peer, err)
		}
	}
	return l.Attrs().Index
}

// skbCtx is struct __sk_buff (192 bytes); BPF_PROG_TEST_RUN accepts
// mark and ifindex among the fields named here.
type skbCtx struct {
	Len            uint32
	PktType        uint32
	Mark           uint32
	QueueMapping   uint32
	Protocol       uint32
	VlanPresent    uint32
	VlanTCI        uint32
	VlanProto      uint32
	Priority       uint32
	IngressIfindex uint32
	Ifindex        uint32
	_              [148]byte
}

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// packet describes a crafted Ethernet frame.
type packet struct {
	src, dst     netip.AddrPort
	proto        uint8 // unix.IPPROTO_TCP when 0
	flags        uint8 // TCP flags
	etherType    uint16
	fragOffset   uint16 // in 8-byte units
	moreFragment bool
}

func (p packet) bytes() []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 2})
	et := p.etherType
	if et == 0 {
		et = unix.ETH_P_IP
	}
	binary.BigEndian.PutUint16(eth[12:], et)
	if et != unix.ETH_P_IP {
		return append(eth, make([]byte, 46)...)
	}
	proto := p.proto
	if proto == 0 {
		proto = unix.IPPROTO_TCP
	}
	var l4 []byte
	switch proto {
	case unix.IPPROTO_TCP:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 1000)
		l4[12] = 5 << 4
		l4[13] = p.flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
	case unix.IPPROTO_UDP:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], 8)
	}
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	frag := p.fragOffset & 0x1fff
	if p.moreFragment {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ip[8] = 64
	ip[9] = proto
	s, d := p.src.Addr().As4(), p.dst.Addr().As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	return append(append(eth, ip...), l4...)
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// requireRoot is privtest.Require, kept short for the tables.
func requireRoot(t testing.TB) { t.Helper(); privtest.Require(t) }

// diff returns the counters that changed since before, as "event+n"
// strings (the event names of Counters.Events).
func (c Counters) diff(before Counters) string {
	var out []string
	was := before.Events()
	for i, e := range c.Events() {
		if e.Value != was[i].Value {
			out = append(out, fmt.Sprintf("%s%+d", e.Name, int64(e.Value-was[i].Value)))
		}
	}
	return strings.Join(out, " ")
}
