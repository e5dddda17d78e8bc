package bpf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// A node with one pod and one uplink, all in namespaces of the test:
//
//	pod ns:    eth0 198.19.1.10/32, default via 169.254.1.1 (routed CNI style)
//	node ns:   vpod 169.254.1.1/32, route 198.19.1.10 dev vpod
//	           vup 198.18.0.1/24 (the node's address, the uplink)
//	           route 198.51.100.0/24 via 198.18.0.2
//	remote ns: eth0 198.18.0.2/24 and 198.51.100.7/32 (another node, and
//	           the "real" destination of captured connections)
//	           route 198.19.0.0/16 via 198.18.0.1
type testbed struct {
	node, pod, remote netns.NsHandle
	cfg               Config
	d                 *Datapath
	podIf, upIf       int
	outbound, hbone   *net.TCPListener
}

var (
	realDst = netip.MustParseAddr("198.51.100.7")
	peerIP  = netip.MustParseAddr("198.18.0.2")
)

func mustAddr(t testing.TB, l netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, l.Attrs().Name, err)
	}
}

func mustRoute(t testing.TB, r *netlink.Route) {
	t.Helper()
	if err := netlink.RouteAdd(r); err != nil {
		t.Fatalf("add route %v: %v", r, err)
	}
}

func prefix(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func linkUp(t testing.TB, name string) netlink.Link {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatalf("set %s up: %v", name, err)
	}
	return l
}

// newTopology builds the namespaces and links; the test goroutine stays
// in the node's namespace.
func newTopology(t testing.TB) *testbed {
	t.Helper()
	requireRoot(t)
	tb := &testbed{node: newNS(t), pod: newNS(t), remote: newNS(t)}
	enter(t, tb.node)

	tb.podIf = addVeth(t, "vpod", "eth0", &tb.pod)
	vpod := linkUp(t, "vpod")
	mustAddr(t, vpod, "169.254.1.1/32")
	mustRoute(t, &netlink.Route{LinkIndex: tb.podIf, Dst: prefix("198.19.1.10/32"), Scope: netlink.SCOPE_LINK})
	inNS(t, tb.pod, func() {
		eth0 := linkUp(t, "eth0")
		mustAddr(t, eth0, "198.19.1.10/32")
		mustRoute(t, &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: prefix("169.254.1.1/32"), Scope: netlink.SCOPE_LINK})
		mustRoute(t, &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("169.254.1.1")})
	})

	tb.upIf = addVeth(t, "vup", "eth0", &tb.remote)
	vup := linkUp(t, "vup")
	mustAddr(t, vup, "198.18.0.1/24")
	mustRoute(t, &netlink.Route{Dst: prefix("198.51.100.0/24"), Gw: net.ParseIP("198.18.0.2")})
	inNS(t, tb.remote, func() {
		eth0 := linkUp(t, "eth0")
		mustAddr(t, eth0, "198.18.0.2/24")
		mustAddr(t, eth0, "198.51.100.7/32")
		mustRoute(t, &netlink.Route{Dst: prefix("198.19.0.0/16"), Gw: net.ParseIP("198.18.0.1")})
	})
	return tb
}

// newTestbed is newTopology plus an opened data path with the pod
// enrolled, the uplink attached and listeners in both slots.
func newTestbed(t testing.TB, strict bool) *testbed {
	t.Helper()
	tb := newTopology(t)
	tb.cfg = testConfig(t)
	tb.open(t)
	tb.enroll(t, strict)
	tb.outbound = tb.listen(t, Outbound)
	tb.hbone = tb.listen(t, HBONE)
	return tb
}

func (tb *testbed) open(t testing.TB) {
	t.Helper()
	d, err := Open(context.Background(), tb.cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	tb.d = d
}

func (tb *testbed) enroll(t testing.TB, strict bool) {
	t.Helper()
	if err := tb.d.EnrollPod(Pod{HostIfName: "vpod", IPs: []netip.Addr{podIP}, Strict: strict}); err != nil {
		t.Fatalf("EnrollPod: %v", err)
	}
	if err := tb.d.AttachUplink("vup"); err != nil {
		t.Fatalf("AttachUplink: %v", err)
	}
}

// listen opens the ztunnel-style listener for slot in the node's
// namespace and puts it into the slot.
func (tb *testbed) listen(t testing.TB, slot Slot) *net.TCPListener {
	t.Helper()
	l, err := Listen(context.Background(), fmt.Sprintf("127.0.0.1:%d", slot.Port()), tb.cfg.ZtunnelMark)
	if err != nil {
		t.Fatalf("listen for %s: %v", slot, err)
	}
	t.Cleanup(func() { l.Close() })
	if err := tb.d.SetListener(slot, l.(*net.TCPListener)); err != nil {
		t.Fatalf("SetListener(%s): %v", slot, err)
	}
	return l.(*net.TCPListener)
}

// dialFrom dials addr from a thread in ns.
func dialFrom(t *testing.T, ns netns.NsHandle, d net.Dialer, addr netip.AddrPort) (net.Conn, error) {
	t.Helper()
	var (
		c   net.Conn
		err error
	)
	if d.Timeout == 0 {
		d.Timeout = 3 * time.Second
	}
	inNS(t, ns, func() { c, err = d.Dial("tcp4", addr.String()) })
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// accept waits for one connection on l.
func accept(t *testing.T, l *net.TCPListener) net.Conn {
	t.Helper()
	_ = l.SetDeadline(time.Now().Add(3 * time.Second))
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept on %s: %v", l.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// nothingAccepted checks that l got no connection.
func nothingAccepted(t *testing.T, l *net.TCPListener) {
	t.Helper()
	_ = l.SetDeadline(time.Now().Add(100 * time.Millisecond))
	if c, err := l.Accept(); err == nil {
		c.Close()
		t.Errorf("%s accepted a connection from %s, want none", l.Addr(), c.RemoteAddr())
	}
}

// exchange sends a line each way and checks that it arrives intact.
func exchange(t *testing.T, client, server net.Conn) {
	t.Helper()
	for _, dir := range []struct {
		from, to net.Conn
		msg      string
	}{{client, server, "ping from the client\n"}, {server, client, "pong from the server\n"}} {
		if _, err := io.WriteString(dir.from, dir.msg); err != nil {
			t.Fatalf("write: %v", err)
		}
		_ = dir.to.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, len(dir.msg))
		if _, err := io.ReadFull(dir.to, buf); err != nil || string(buf) != dir.msg {
			t.Fatalf("read %q (%v), want %q", buf, err, dir.msg)
		}
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	return a.(*net.TCPAddr).AddrPort()
}

// listenIn opens a plain listener in ns.
func listenIn(t *testing.T, ns netns.NsHandle, addr string) *net.TCPListener {
	t.Helper()
	var (
		l   net.Listener
		err error
	)
	inNS(t, ns, func() { l, err = net.Listen("tcp4", addr) })
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

func (tb *testbed) counters(t *testing.T) Counters {
	t.Helper()
	c, err := tb.d.Counters()
	if err != nil {
		t.Fatalf("Counters: %v", err)
	}
	return c
}

// TestOutboundCapture proves the whole recipe: a SYN from the pod is
// marked, policy routing delivers it locally, sk_lookup hands it to the
// outbound listener, whose accepted socket names the original destination
// and the pod; the rest of the flow is assigned to that socket.
func TestOutboundCapture(t *testing.T) {
	tb := newTestbed(t, false)
	real := listenIn(t, tb.remote, "198.51.100.7:8080")
	before := tb.counters(t)

	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("pod dial: %v", err)
	}
	server := accept(t, tb.outbound)
	if got, want := addrPort(server.LocalAddr()), ap(realDst, 8080); got != want {
		t.Errorf("accepted socket's LocalAddr = %s, want the original destination %s", got, want)
	}
	if got, want := addrPort(server.RemoteAddr()), addrPort(client.LocalAddr()); got != want {
		t.Errorf("accepted socket's RemoteAddr = %s, want the pod's %s", got, want)
	}
	if got := addrPort(client.RemoteAddr()); got != ap(realDst, 8080) {
		t.Errorf("the pod sees its peer as %s", got)
	}
	exchange(t, client, server)
	nothingAccepted(t, real)

	c := tb.counters(t)
	if c.Redirected-before.Redirected != 1 || c.LookupOutbound-before.LookupOutbound != 1 {
		t.Errorf("counters changed by %q, want redirected+1 lookup_outbound+1", c.diff(before))
	}
	if c.Assigned == before.Assigned || c.AssignFailed != before.AssignFailed {
		t.Errorf("counters changed by %q, want the flow's later packets assigned to the accepted socket", c.diff(before))
	}
}

func TestOutboundCaptureLeavesExclusionsAlone(t *testing.T) {
	tb := newTestbed(t, false)
	tests := []struct {
		name   string
		listen string // in the namespace of where
		where  *netns.NsHandle
		dst    netip.AddrPort
	}{
		{"a connection to the node's own address reaches the node", "198.18.0.1:9999", &tb.node, ap(nodeIP, 9999)},
		{"a connection to an excluded port reaches its destination", "198.51.100.7:22", &tb.remote, ap(realDst, 22)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, tb.node)
			l := listenIn(t, *tt.where, tt.listen)
			before := tb.counters(t)
			client, err := dialFrom(t, tb.pod, net.Dialer{}, tt.dst)
			if err != nil {
				t.Fatalf("pod dial: %v", err)
			}
			server := accept(t, l)
			exchange(t, client, server)
			nothingAccepted(t, tb.outbound)
			if c := tb.counters(t); c.Excluded-before.Excluded != 1 || c.Redirected != before.Redirected {
				t.Errorf("counters changed by %q, want excluded+1 and nothing redirected", c.diff(before))
			}
		})
	}
}

// TestFailClosedWithoutListener: with the outbound slot empty (the
// ztunnel is away), a captured connection fails instead of leaving the
// node in plaintext.
func TestFailClosedWithoutListener(t *testing.T) {
	tb := newTestbed(t, false)
	real := listenIn(t, tb.remote, "198.51.100.7:8080")
	if err := tb.d.ClearListener(Outbound); err != nil {
		t.Fatal(err)
	}
	if tb.d.Ready() {
		t.Errorf("Ready() with an empty outbound slot, status %q", tb.d.Status())
	}
	before := tb.counters(t)
	if c, err := dialFrom(t, tb.pod, net.Dialer{Timeout: 1500 * time.Millisecond}, ap(realDst, 8080)); err == nil {
		t.Fatalf("pod dial succeeded (peer %s), want it to fail", c.RemoteAddr())
	}
	nothingAccepted(t, real)
	if c := tb.counters(t); c.NoListener == before.NoListener {
		t.Errorf("counters changed by %q, want no_listener to rise", c.diff(before))
	}

	// The listener closing empties the slot as well.
	tb.outbound.Close()
	tb.outbound = tb.listen(t, Outbound)
	tb.outbound.Close()
	if tb.d.Status().HasListener(Outbound) {
		t.Errorf("a closed listener still fills the outbound slot")
	}
}

// TestHBONECaptureFromUplink: a connection from another node to a local
// pod's address, port 15008, reaches the HBONE listener, which learns the
// pod from its local address.
func TestHBONECaptureFromUplink(t *testing.T) {
	tb := newTestbed(t, false)
	podSide := listenIn(t, tb.pod, "198.19.1.10:15008")
	before := tb.counters(t)
	client, err := dialFrom(t, tb.remote, net.Dialer{}, ap(podIP, 15008))
	if err != nil {
		t.Fatalf("remote dial: %v", err)
	}
	server := accept(t, tb.hbone)
	if got := addrPort(server.LocalAddr()); got != ap(podIP, 15008) {
		t.Errorf("accepted HBONE socket's LocalAddr = %s, want %s", got, ap(podIP, 15008))
	}
	if got := addrPort(server.RemoteAddr()); got != addrPort(client.LocalAddr()) {
		t.Errorf("accepted HBONE socket's RemoteAddr = %s, want %s", got, client.LocalAddr())
	}
	exchange(t, client, server)
	nothingAccepted(t, podSide)
	c := tb.counters(t)
	if c.UplinkRedirected-before.UplinkRedirected != 1 || c.LookupHBONE-before.LookupHBONE != 1 {
		t.Errorf("counters changed by %q, want uplink_redirected+1 lookup_hbone+1", c.diff(before))
	}

	// Plaintext to the pod from another node is not captured: it is
	// forwarded to the pod (PERMISSIVE).
	plain := listenIn(t, tb.pod, "198.19.1.10:80")
	client, err = dialFrom(t, tb.remote, net.Dialer{}, ap(podIP, 80))
	if err != nil {
		t.Fatalf("remote plaintext dial: %v", err)
	}
	exchange(t, client, accept(t, plain))
}

func TestSpoofedSourceIsDropped(t *testing.T) {
	tb := newTestbed(t, false)
	inNS(t, tb.pod, func() {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		mustAddr(t, eth0, "198.19.1.99/32")
	})
	before := tb.counters(t)
	forged := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("198.19.1.99")}}
	if c, err := dialFrom(t, tb.pod, forged, ap(realDst, 8080)); err == nil {
		t.Fatalf("a dial from a forged source succeeded (peer %s)", c.RemoteAddr())
	}
	nothingAccepted(t, tb.outbound)
	if c := tb.counters(t); c.SpoofDrops == before.SpoofDrops {
		t.Errorf("counters changed by %q, want spoof_drops to rise", c.diff(before))
	}
}

// ztunnelDialer dials like the destination ztunnel delivering to a pod:
// from the client's address (IP_TRANSPARENT) with the ztunnel's mark.
func ztunnelDialer(from netip.Addr, mark uint32) net.Dialer {
	return net.Dialer{
		Timeout:   time.Second,
		LocalAddr: &net.TCPAddr{IP: from.AsSlice()},
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
}

func TestStrict(t *testing.T) {
	tests := []struct {
		name   string
		strict bool
		from   string // remote, probe, ztunnel
		wantOK bool
	}{
		{"STRICT refuses plaintext from another node", true, "remote", false},
		{"STRICT admits a kubelet probe from the node's address", true, "probe", true},
		{"STRICT admits the ztunnel, dialling from the client's address", true, "ztunnel", true},
		{"PERMISSIVE admits plaintext from another node", false, "remote", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := newTestbed(t, tt.strict)
			app := listenIn(t, tb.pod, "198.19.1.10:80")
			before := tb.counters(t)
			var (
				client net.Conn
				err    error
				wantIP netip.Addr
			)
			switch tt.from {
			case "remote":
				client, err = dialFrom(t, tb.remote, net.Dialer{Timeout: time.Second}, ap(podIP, 80))
				wantIP = peerIP
			case "probe":
				client, err = dialFrom(t, tb.node, net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: nodeIP.AsSlice()}}, ap(podIP, 80))
				wantIP = nodeIP
			case "ztunnel":
				client, err = dialFrom(t, tb.node, ztunnelDialer(remotePod, tb.cfg.ZtunnelMark), ap(podIP, 80))
				wantIP = remotePod
			}
			if !tt.wantOK {
				if err == nil {
					t.Fatalf("dial succeeded, want it refused")
				}
				nothingAccepted(t, app)
				if c := tb.counters(t); c.StrictDrops == before.StrictDrops {
					t.Errorf("counters changed by %q, want strict_drops to rise", c.diff(before))
				}
				return
			}
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			server := accept(t, app)
			if got := addrPort(server.RemoteAddr()).Addr(); got != wantIP {
				t.Errorf("the pod sees the client as %s, want %s", got, wantIP)
			}
			exchange(t, client, server)
			if c := tb.counters(t); c.StrictDrops != before.StrictDrops {
				t.Errorf("counters changed by %q, want no STRICT drop", c.diff(before))
			}
		})
	}
}

// attachedCount counts the programs attached to ifindex in one direction,
// whichever way (TCX or clsact).
func attachedCount(t *testing.T, ifindex int, at ebpf.AttachType) int {
	t.Helper()
	n := 0
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: at})
	if err == nil {
		n += len(res.Programs)
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		t.Fatal(err)
	}
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if at == ebpf.AttachTCXEgress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	filters, err := netlink.FilterList(l, parent)
	if err == nil {
		for _, f := range filters {
			if _, ok := f.(*netlink.BpfFilter); ok {
				n++
			}
		}
	}
	return n
}

func skLookupCount(t *testing.T, ns netns.NsHandle) int {
	t.Helper()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(ns), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatalf("query sk_lookup: %v", err)
	}
	return len(res.Programs)
}

// checkAttached checks that exactly one of each program is attached.
func (tb *testbed) checkAttached(t *testing.T, want int) {
	t.Helper()
	for _, c := range []struct {
		what    string
		ifindex int
		at      ebpf.AttachType
	}{
		{"pod ingress", tb.podIf, ebpf.AttachTCXIngress},
		{"pod egress", tb.podIf, ebpf.AttachTCXEgress},
		{"uplink ingress", tb.upIf, ebpf.AttachTCXIngress},
	} {
		if got := attachedCount(t, c.ifindex, c.at); got != want {
			t.Errorf("%d programs on %s, want %d", got, c.what, want)
		}
	}
	if got := skLookupCount(t, tb.node); got != want {
		t.Errorf("%d sk_lookup programs on the node's namespace, want %d", got, want)
	}
}

// TestRestartAdoptsPins: after Close (the agent goes away) traffic keeps
// being captured, and a new Open adopts the pins without attaching
// anything twice.
func TestRestartAdoptsPins(t *testing.T) {
	tb := newTestbed(t, true)
	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatal(err)
	}
	established := accept(t, tb.outbound)

	if _, err := Open(context.Background(), tb.cfg, nil); !errors.Is(err, ErrLocked) {
		t.Errorf("a second Open on a held pin dir: %v, want ErrLocked", err)
	}
	before := tb.counters(t)
	if err := tb.d.Close(); err != nil {
		t.Fatal(err)
	}

	// Agent away: the established connection works, and new connections
	// are still captured (the listener is still in the pinned SOCKMAP).
	exchange(t, client, established)
	c2, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8081))
	if err != nil {
		t.Fatalf("dial while the agent is away: %v", err)
	}
	exchange(t, c2, accept(t, tb.outbound))

	tb.open(t)
	if got := tb.d.Enrolled(); !slices.Equal(got, []int{tb.podIf}) {
		t.Errorf("Enrolled() after re-Open = %v, want [%d]", got, tb.podIf)
	}
	st := tb.d.Status()
	if !st.Ready() || !slices.Equal(st.Uplinks, []int{tb.upIf}) {
		t.Errorf("Status() after re-Open = %+v (%s), want ready with uplink %d", st, st, tb.upIf)
	}
	tb.checkAttached(t, 1)
	if c := tb.counters(t); c.LookupOutbound <= before.LookupOutbound {
		t.Errorf("counters after re-Open: %+v, want them kept and grown", c)
	}
	tb.enroll(t, true) // what the agent's reconcile does: a no-op
	tb.checkAttached(t, 1)
	exchange(t, client, established)
}

func TestUnenrollAndCleanup(t *testing.T) {
	tb := newTestbed(t, true)
	real := listenIn(t, tb.remote, "198.51.100.7:8080")
	if err := tb.d.UnenrollPod(tb.podIf); err != nil {
		t.Fatalf("UnenrollPod: %v", err)
	}
	if got := tb.d.Enrolled(); len(got) != 0 {
		t.Errorf("Enrolled() after UnenrollPod = %v", got)
	}
	if n := attachedCount(t, tb.podIf, ebpf.AttachTCXIngress) + attachedCount(t, tb.podIf, ebpf.AttachTCXEgress); n != 0 {
		t.Errorf("%d programs left on the pod's veth after UnenrollPod", n)
	}
	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("dial from an unenrolled pod: %v", err)
	}
	exchange(t, client, accept(t, real))
	if err := tb.d.UnenrollPod(tb.podIf); err != nil {
		t.Errorf("UnenrollPod again: %v", err)
	}

	tb.enroll(t, true)
	if _, err := Cleanup(context.Background(), tb.cfg.PinDir); !errors.Is(err, ErrLocked) {
		t.Errorf("Cleanup while the agent runs: %v, want ErrLocked", err)
	}
	tb.d.Close()
	rep, err := Cleanup(context.Background(), tb.cfg.PinDir)
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	// sk_lookup, the pod's two programs, the uplink's two.
	if !rep.Found || len(rep.Detached) != 5 || rep.Rule != "removed" || rep.Route != "removed" || !rep.PinsRemoved {
		t.Errorf("Cleanup reported %+v, want 5 programs detached, rule and route removed, pins removed", rep)
	}
	tb.checkAttached(t, 0)
	if _, err := os.Stat(tb.cfg.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir after Cleanup: %v", err)
	}
	rules, err := netlink.RuleList(netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Table == tb.cfg.RouteTable {
			t.Errorf("rule left after Cleanup: %v", r)
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: tb.cfg.RouteTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 0 {
		t.Errorf("routes left in table %d after Cleanup: %v", tb.cfg.RouteTable, routes)
	}
	client, err = dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("dial after Cleanup: %v", err)
	}
	exchange(t, client, accept(t, real))
	rep, err = Cleanup(context.Background(), tb.cfg.PinDir)
	if err != nil {
		t.Errorf("Cleanup of a removed pin dir: %v", err)
	}
	if want := "nothing pinned at " + tb.cfg.PinDir + ": nothing removed"; rep.Found || rep.String() != want {
		t.Errorf("Cleanup of a removed pin dir reported %q, want %q", rep, want)
	}
}

// TestClsactFallback runs the recipe with the clsact attachment that
// kernels without TCX (< 6.6) get.
func TestClsactFallback(t *testing.T) {
	orig := attachTCX
	attachTCX = func(link.TCXOptions) (link.Link, error) {
		return nil, fmt.Errorf("tcx: %w", ebpf.ErrNotSupported)
	}
	t.Cleanup(func() { attachTCX = orig })

	tb := newTestbed(t, false)
	tb.checkAttached(t, 1)
	client, err := dialFrom(t, tb.pod, net.Dialer{}, ap(realDst, 8080))
	if err != nil {
		t.Fatalf("pod dial: %v", err)
	}
	server := accept(t, tb.outbound)
	if got := addrPort(server.LocalAddr()); got != ap(realDst, 8080) {
		t.Errorf("LocalAddr = %s", got)
	}
	exchange(t, client, server)

	tb.d.Close()
	tb.open(t)
	tb.enroll(t, false)
	tb.checkAttached(t, 1)
	if got := tb.d.Enrolled(); !slices.Equal(got, []int{tb.podIf}) {
		t.Errorf("Enrolled() after re-Open = %v", got)
	}
	exchange(t, client, server)
	tb.d.Close()
	if _, err := Cleanup(context.Background(), tb.cfg.PinDir); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	tb.checkAttached(t, 0)
}

// TestVethRemovalIsForgotten: when a pod's veth disappears while the
// agent is away, the next Open drops its pins and map entries.
func TestVethRemovalIsForgotten(t *testing.T) {
	tb := newTestbed(t, false)
	tb.d.Close()
	l, err := netlink.LinkByName("vpod")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkDel(l); err != nil {
		t.Fatal(err)
	}
	tb.open(t)
	if got := tb.d.Enrolled(); len(got) != 0 {
		t.Errorf("Enrolled() = %v after the veth went away", got)
	}
	var (
		k mantletPodIpKey
		v uint8
	)
	if it := tb.d.objs.PodIps.Iterate(); it.Next(&k, &v) {
		t.Errorf("pod address %+v still in the map", k)
	}
	entries, _ := os.ReadDir(tb.cfg.PinDir + "/links")
	for _, e := range entries {
		if strings.Contains(e.Name(), fmt.Sprintf("if%d-pod", tb.podIf)) {
			t.Errorf("pin %s left", e.Name())
		}
	}
}

func TestSetListenerRefusals(t *testing.T) {
	tb := newTopology(t)
	tb.cfg = testConfig(t)
	tb.open(t)
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(true)
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if lc.MultipathTCP() {
		err := tb.d.SetListener(Outbound, l.(*net.TCPListener))
		if err == nil || !strings.Contains(err.Error(), "MPTCP") {
			// Without kernel MPTCP support Go falls back to TCP.
			var proto int
			rc, _ := l.(*net.TCPListener).SyscallConn()
			_ = rc.Control(func(fd uintptr) { proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
			if proto == unix.IPPROTO_MPTCP {
				t.Errorf("SetListener(MPTCP listener) = %v, want an error naming MPTCP", err)
			}
		}
	}
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := tb.d.SetListener(Outbound, c.(*net.TCPConn)); err == nil || !strings.Contains(err.Error(), "not listening") {
		t.Errorf("SetListener(a connection) = %v, want 'not listening'", err)
	}
	if err := tb.d.SetListener(Slot(7), l.(*net.TCPListener)); err == nil {
		t.Errorf("SetListener(slot 7) succeeded")
	}
	if tb.d.Ready() {
		t.Errorf("Ready() without listeners")
	}
}

// TestTimeWaitReuse: a pod reconnecting from the same port while the
// ztunnel's side of the previous connection waits in TIME_WAIT gets the
// outbound listener at once (the SYN goes to the TIME_WAIT socket, which
// hands it to the listener lookup), with no retransmission stall.
func TestTimeWaitReuse(t *testing.T) {
	tb := newTestbed(t, false)
	from := &net.TCPAddr{IP: podIP.AsSlice(), Port: 40123}
	before := tb.counters(t)
	for i := range 3 {
		start := time.Now()
		client, err := dialFrom(t, tb.pod, net.Dialer{Timeout: 900 * time.Millisecond, LocalAddr: from}, ap(realDst, 8080))
		if err != nil {
			t.Fatalf("connection %d from port %d: %v", i, from.Port, err)
		}
		server := accept(t, tb.outbound)
		exchange(t, client, server)
		// The ztunnel's side closes first and goes to TIME_WAIT.
		server.Close()
		_ = client.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := client.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("connection %d: read after the server closed: %v, want EOF", i, err)
		}
		client.Close()
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("connection %d took %v", i, d)
		}
	}
	// Only the first SYN was marked as new; the others were assigned to
	// the TIME_WAIT socket, and all three reached the listener.
	if c := tb.counters(t); c.Redirected-before.Redirected != 1 || c.LookupOutbound-before.LookupOutbound != 3 {
		t.Errorf("counters changed by %q, want redirected+1 lookup_outbound+3", c.diff(before))
	}
}

// TestOutboundCaptureOfADNATedService: kube-proxy's DNAT of a Service's
// virtual IP happens after tc, so the ztunnel's socket is keyed by the
// endpoint while the pod's later packets still name the virtual IP. The
// whole flow reaches the ztunnel (the handshake completes, data goes both
// ways) and nothing reaches the endpoint past it.
func TestOutboundCaptureOfADNATedService(t *testing.T) {
	tb := newTestbed(t, false)
	iptables(t, tb.node, "-t", "nat", "-A", "PREROUTING", "-d", "198.18.130.1/32", "-p", "tcp", "--dport", "80",
		"-j", "DNAT", "--to-destination", "198.51.100.7:8080")
	real := listenIn(t, tb.remote, "198.51.100.7:8080")
	before := tb.counters(t)

	client, err := dialFrom(t, tb.pod, net.Dialer{}, netip.MustParseAddrPort("198.18.130.1:80"))
	if err != nil {
		t.Fatalf("pod dial: %v", err)
	}
	server := accept(t, tb.outbound)
	if got, want := addrPort(server.LocalAddr()), ap(realDst, 8080); got != want {
		t.Errorf("accepted socket's LocalAddr = %s, want the endpoint %s", got, want)
	}
	exchange(t, client, server)
	nothingAccepted(t, real)
	if c := tb.counters(t); c.Assigned == before.Assigned {
		t.Errorf("counters changed by %q, want the flow's later packets assigned to the accepted socket", c.diff(before))
	}
}

// iptables runs iptables in ns (a namespace of the test: its rules go
// with it).
func iptables(t *testing.T, ns netns.NsHandle, args ...string) {
	t.Helper()
	path := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns))
	out, err := exec.Command("nsenter", append([]string{"--net=" + path, "--", "iptables"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables %s: %v: %s", strings.Join(args, " "), err, out)
	}
}
