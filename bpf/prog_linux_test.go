package bpf

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Verdicts of tc programs as BPF_PROG_TEST_RUN reports them.
const (
	verdictNext = 0xffffffff // TC_ACT_UNSPEC: no opinion, the packet goes on
	verdictDrop = 2          // TC_ACT_SHOT
)

// BPF_PROG_TEST_RUN does not run programs at tc ingress, the only place
// where the kernel accepts bpf_sk_assign. A SYN that the programs steer
// to a listener gets that far only once the listener and the local route
// were found; there the assignment is refused, and the packet dropped and
// counted as lookup_failed. These are the verdict and counters of such a
// SYN under BPF_PROG_TEST_RUN; TestOutboundCapture and
// TestHBONECaptureFromUplink prove the assignment on real traffic.
const (
	verdictSteered = verdictDrop
	countsSteered  = "lookup_failed+1"
)

// progFixture is an opened data path in a fresh namespace with a pod veth
// ("vpod", enrolled, STRICT) and an uplink veth ("vup"), for feeding the
// programs crafted packets with BPF_PROG_TEST_RUN.
type progFixture struct {
	d           *Datapath
	ns          netns.NsHandle
	pod, uplink int
	cfg         Config
}

func newProgFixture(t testing.TB, edit func(*Config)) *progFixture {
	t.Helper()
	requireRoot(t)
	f := &progFixture{ns: newNS(t)}
	enter(t, f.ns)
	f.pod = addVeth(t, "vpod", "vpodp", nil)
	up := addVeth(t, "vup", "vupp", nil)
	// Routes as on a node: the pod by its veth, other nodes' pods through
	// the uplink (so that a packet without the capture rule would be
	// forwarded).
	mustRoute(t, &netlink.Route{LinkIndex: f.pod, Dst: prefix(podIP.String() + "/32"), Scope: netlink.SCOPE_LINK})
	vup, err := netlink.LinkByIndex(up)
	if err != nil {
		t.Fatal(err)
	}
	mustAddr(t, vup, nodeIP.String()+"/24")
	mustRoute(t, &netlink.Route{Dst: prefix("198.19.2.0/24"), Gw: net.ParseIP("198.18.0.2")})
	f.cfg = testConfig(t)
	if edit != nil {
		edit(&f.cfg)
	}
	d, err := Open(context.Background(), f.cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	f.d = d
	if err := d.EnrollPod(Pod{HostIfName: "vpod", IPs: []netip.Addr{podIP, netip.MustParseAddr("127.0.0.1")}, Strict: true}); err != nil {
		t.Fatalf("EnrollPod: %v", err)
	}
	if err := d.AttachUplink("vup"); err != nil {
		t.Fatalf("AttachUplink: %v", err)
	}
	f.uplink = d.Status().Uplinks[0]
	if err := d.SetLocalPod(podIP, true); err != nil {
		t.Fatalf("SetLocalPod: %v", err)
	}
	for _, slot := range Slots() {
		if err := f.listen(t, slot); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// listen fills slot with a listener of the fixture's namespace.
func (f *progFixture) listen(t testing.TB, slot Slot) error {
	var (
		l   net.Listener
		err error
	)
	inNS(t, f.ns, func() { l, err = Listen(context.Background(), "127.0.0.1:0", f.cfg.ZtunnelMark) })
	if err != nil {
		return fmt.Errorf("listen for %s: %w", slot, err)
	}
	t.Cleanup(func() { l.Close() })
	return f.d.SetListener(slot, l.(*net.TCPListener))
}

func (f *progFixture) counters(t testing.TB) Counters {
	t.Helper()
	c, err := f.d.Counters()
	if err != nil {
		t.Fatalf("Counters: %v", err)
	}
	return c
}

// runTC feeds pkt to prog as if it arrived on ifindex with skb->mark =
// mark, and returns the verdict and the mark afterwards.
func (f *progFixture) runTC(t *testing.T, prog *ebpf.Program, ifindex int, pkt []byte, mark uint32) (uint32, uint32) {
	t.Helper()
	in := skbCtx{Mark: mark, Ifindex: uint32(ifindex)}
	var out skbCtx
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, Context: in, ContextOut: &out})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	return ret, out.Mark
}

func TestPodIngress(t *testing.T) {
	f := newProgFixture(t, nil)
	const pass = DefaultPassMark
	tests := []struct {
		name        string
		pkt         packet
		mark        uint32
		wantVerdict uint32
		wantMark    uint32
		wantCounts  string
	}{
		{"a SYN to a pod of another node is steered to the outbound listener", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0, verdictSteered, 0, "redirected+1 " + countsSteered},
		{"a SYN to a pod of the same node is steered to the outbound listener", packet{src: ap(podIP, 40000), dst: ap(otherPodIP, 80), flags: tcpSYN}, 0, verdictSteered, 0, "redirected+1 " + countsSteered},
		{"a forged source address is dropped and counted", packet{src: ap(otherPodIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0, verdictDrop, 0, "spoof_dropped+1"},
		{"forged UDP is dropped too", packet{src: ap(remotePod, 53), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0, verdictDrop, 0, "spoof_dropped+1"},
		{"UDP from the pod passes stamped", packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0, verdictNext, pass, ""},
		{"a SYN to the node's own address is not captured and passes stamped", packet{src: ap(podIP, 40000), dst: ap(nodeIP, 10250), flags: tcpSYN}, 0, verdictNext, pass, "excluded+1"},
		{"a SYN into an excluded CIDR is not captured and passes stamped", packet{src: ap(podIP, 40000), dst: ap(excludedIP, 443), flags: tcpSYN}, 0, verdictNext, pass, "excluded+1"},
		{"a SYN to an excluded port is not captured and passes stamped", packet{src: ap(podIP, 40000), dst: ap(remotePod, 22), flags: tcpSYN}, 0, verdictNext, pass, "excluded+1"},
		{"stamping keeps the other mark bits", packet{src: ap(podIP, 40000), dst: ap(remotePod, 22), flags: tcpSYN}, 0x4005, verdictNext, 0x4005 | pass, "excluded+1"},
		{"an ACK of a flow no local socket owns passes stamped", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpACK}, 0, verdictNext, pass, ""},
		{"a SYN-ACK (the pod answering) is not a new connection", packet{src: ap(podIP, 80), dst: ap(remotePod, 40000), flags: tcpSYN | tcpACK}, 0, verdictNext, pass, ""},
		{"a non-first fragment passes stamped", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), fragOffset: 10}, 0, verdictNext, pass, ""},
		{"an ARP frame passes", packet{etherType: unix.ETH_P_ARP}, 0, verdictNext, 0, ""},
		{"IPv6 passes (not captured yet)", packet{etherType: unix.ETH_P_IPV6}, 0, verdictNext, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			before := f.counters(t)
			verdict, mark := f.runTC(t, f.d.objs.PodIngress, f.pod, tt.pkt.bytes(), tt.mark)
			if verdict != tt.wantVerdict || mark != tt.wantMark {
				t.Errorf("verdict %#x mark %#x, want verdict %#x mark %#x", verdict, mark, tt.wantVerdict, tt.wantMark)
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}

// TestPodIngressAssignsOwnedFlows checks the socket lookup: packets of a
// flow that a local socket owns (here: loopback connections in the test's
// namespace, with 127.0.0.1 as one of the pod's addresses) are assigned
// to that socket and marked, a listener is never assigned, and a SYN that
// reuses a TIME_WAIT tuple goes to the TIME_WAIT socket.
func TestPodIngressAssignsOwnedFlows(t *testing.T) {
	f := newProgFixture(t, nil)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	cAddr := client.LocalAddr().(*net.TCPAddr).AddrPort()
	sAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	fromClient := packet{src: cAddr, dst: sAddr, flags: tcpACK}

	// Under BPF_PROG_TEST_RUN the kernel refuses bpf_sk_assign (see
	// verdictSteered): a packet whose owner was found ends as
	// assign_failed, dropped, never forwarded.
	before := f.counters(t)
	verdict, _ := f.runTC(t, f.d.objs.PodIngress, f.pod, fromClient.bytes(), 0)
	if verdict != verdictDrop {
		t.Errorf("established flow: verdict %#x, want %#x (the owner found, its assignment refused under test-run)", verdict, uint32(verdictDrop))
	}
	if got := f.counters(t).diff(before); got != "assign_failed+1" {
		t.Errorf("established flow: counters changed by %q, want assign_failed+1", got)
	}

	// A local listener on the destination's port is not the flow's owner:
	// the SYN goes to the ztunnel's listener, like any other.
	before = f.counters(t)
	syn := packet{src: ap(netip.MustParseAddr("127.0.0.1"), 40999), dst: sAddr, flags: tcpSYN}
	verdict, _ = f.runTC(t, f.d.objs.PodIngress, f.pod, syn.bytes(), 0)
	if verdict != verdictSteered {
		t.Errorf("SYN to a listener: verdict %#x", verdict)
	}
	if got, want := f.counters(t).diff(before), "redirected+1 "+countsSteered; got != want {
		t.Errorf("SYN to a local listener: counters changed by %q, want %q (never assigned to that listener)", got, want)
	}

	// The server closes first, so its socket waits in TIME_WAIT.
	server.Close()
	buf := make([]byte, 1)
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = client.Read(buf)
	client.Close()
	time.Sleep(50 * time.Millisecond)
	before = f.counters(t)
	reuse := packet{src: cAddr, dst: sAddr, flags: tcpSYN}
	verdict, _ = f.runTC(t, f.d.objs.PodIngress, f.pod, reuse.bytes(), 0)
	if verdict != verdictDrop {
		t.Errorf("SYN on a TIME_WAIT tuple: verdict %#x", verdict)
	}
	if got := f.counters(t).diff(before); got != "assign_failed+1" {
		t.Errorf("SYN on a TIME_WAIT tuple: counters changed by %q, want it handed to the TIME_WAIT socket (assign_failed+1 under test-run)", got)
	}
}

// TestOrphanedTunneledFlowsAreDropped: once the ztunnel delivered a flow
// to a pod (its marked SYN went out to the pod's veth), the pod's later
// packets of that flow that no socket owns any more (the ztunnel's end
// died with the agent) are dropped and counted, not passed in clear; a
// flow the ztunnel never carried still passes.
func TestOrphanedTunneledFlowsAreDropped(t *testing.T) {
	f := newProgFixture(t, nil)
	enter(t, f.ns)
	if err := f.d.EnrollPod(Pod{HostIfindex: f.pod, IPs: []netip.Addr{podIP}}); err != nil {
		t.Fatalf("EnrollPod: %v", err)
	}
	syn := packet{src: ap(remotePod, 41000), dst: ap(podIP, 80), flags: tcpSYN}
	if verdict, _ := f.runTC(t, f.d.objs.PodEgress, f.pod, syn.bytes(), DefaultZtunnelMark); verdict != verdictNext {
		t.Fatalf("the ztunnel's SYN to the pod: verdict %#x, want %#x", verdict, uint32(verdictNext))
	}
	before := f.counters(t)
	reply := packet{src: ap(podIP, 80), dst: ap(remotePod, 41000), flags: tcpACK}
	if verdict, mark := f.runTC(t, f.d.objs.PodIngress, f.pod, reply.bytes(), 0); verdict != verdictDrop || mark&DefaultPassMark != 0 {
		t.Errorf("the pod's reply with the ztunnel's end gone: verdict %#x mark %#x, want dropped %#x unstamped", verdict, mark, uint32(verdictDrop))
	}
	if got := f.counters(t).diff(before); got != "orphan_dropped+1" {
		t.Errorf("counters changed by %q, want %q", got, "orphan_dropped+1")
	}
	other := packet{src: ap(podIP, 80), dst: ap(remotePod, 41001), flags: tcpACK}
	if verdict, mark := f.runTC(t, f.d.objs.PodIngress, f.pod, other.bytes(), 0); verdict != verdictNext || mark&DefaultPassMark == 0 {
		t.Errorf("a flow the ztunnel never carried: verdict %#x mark %#x, want passed stamped", verdict, mark)
	}
}

func TestPodEgressStrict(t *testing.T) {
	f := newProgFixture(t, nil)
	tests := []struct {
		name        string
		strict      bool
		pkt         packet
		mark        uint32
		wantVerdict uint32
		wantCounts  string
	}{
		{"STRICT drops a plaintext SYN from a pod of another node", true, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictDrop, "strict_dropped+1"},
		{"STRICT drops a SYN with only some of the ztunnel's mark bits", true, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, DefaultZtunnelMark >> 1, verdictDrop, "strict_dropped+1"},
		{"STRICT lets the ztunnel's SYN through", true, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, DefaultZtunnelMark, verdictNext, ""},
		{"STRICT lets a kubelet probe from the node's address through", true, packet{src: ap(nodeIP, 40000), dst: ap(podIP, 8080), flags: tcpSYN}, 0, verdictNext, ""},
		{"STRICT lets replies to the pod's own connections through", true, packet{src: ap(remotePod, 443), dst: ap(podIP, 40000), flags: tcpSYN | tcpACK}, 0, verdictNext, ""},
		{"STRICT lets non-SYN segments through", true, packet{src: ap(remotePod, 443), dst: ap(podIP, 40000), flags: tcpACK}, 0, verdictNext, ""},
		{"STRICT leaves UDP alone", true, packet{src: ap(remotePod, 53), dst: ap(podIP, 5353), proto: unix.IPPROTO_UDP}, 0, verdictNext, ""},
		{"PERMISSIVE lets a plaintext SYN through", false, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictNext, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			if err := f.d.EnrollPod(Pod{HostIfindex: f.pod, IPs: []netip.Addr{podIP}, Strict: tt.strict}); err != nil {
				t.Fatalf("EnrollPod: %v", err)
			}
			before := f.counters(t)
			verdict, mark := f.runTC(t, f.d.objs.PodEgress, f.pod, tt.pkt.bytes(), tt.mark)
			if verdict != tt.wantVerdict || mark != tt.mark {
				t.Errorf("verdict %#x mark %#x, want verdict %#x mark unchanged %#x", verdict, mark, tt.wantVerdict, tt.mark)
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}

func TestUplinkIngress(t *testing.T) {
	f := newProgFixture(t, nil)
	tests := []struct {
		name        string
		pkt         packet
		wantVerdict uint32
		wantCounts  string
	}{
		{"an HBONE SYN to a local pod is steered to the HBONE listener", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpSYN}, verdictSteered, "uplink_redirected+1 " + countsSteered},
		{"a plaintext SYN to a local pod is not captured (inbound plaintext is off)", packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, verdictNext, ""},
		{"an HBONE SYN to a pod that is not local passes", packet{src: ap(remotePod, 40000), dst: ap(otherPodIP, 15008), flags: tcpSYN}, verdictNext, ""},
		{"an ACK to a local pod without a local socket passes", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpACK}, verdictNext, ""},
		{"UDP to a local pod passes", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), proto: unix.IPPROTO_UDP}, verdictNext, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			before := f.counters(t)
			verdict, mark := f.runTC(t, f.d.objs.UplinkIngress, f.uplink, tt.pkt.bytes(), 0)
			if verdict != tt.wantVerdict || mark != 0 {
				t.Errorf("verdict %#x mark %#x, want verdict %#x, mark untouched", verdict, mark, tt.wantVerdict)
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}

func TestUplinkIngressInboundPlainHook(t *testing.T) {
	f := newProgFixture(t, func(c *Config) { c.CaptureInboundPlain = true })
	pkt := packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}
	before := f.counters(t)
	if verdict, _ := f.runTC(t, f.d.objs.UplinkIngress, f.uplink, pkt.bytes(), 0); verdict != verdictSteered {
		t.Errorf("with CaptureInboundPlain a plaintext SYN to a local pod got verdict %#x, want it steered", verdict)
	}
	if got, want := f.counters(t).diff(before), "uplink_redirected+1 "+countsSteered; got != want {
		t.Errorf("counters changed by %q, want %q", got, want)
	}
}

// BenchmarkPrograms measures the cost per packet of the tc programs in
// the kernel (BPF_PROG_TEST_RUN repeating one packet b.N times).
func BenchmarkPrograms(b *testing.B) {
	f := newProgFixture(b, nil)
	benches := []struct {
		name string
		prog *ebpf.Program
		ifx  int
		pkt  packet
		mark uint32
	}{
		{"pod_ingress/SYN captured", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0},
		{"pod_ingress/ACK of a forwarded flow", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpACK}, 0},
		{"pod_ingress/UDP", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0},
		{"pod_ingress/spoofed", f.d.objs.PodIngress, f.pod, packet{src: ap(otherPodIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0},
		{"pod_egress/STRICT drop", f.d.objs.PodEgress, f.pod, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0},
		{"pod_egress/ACK", f.d.objs.PodEgress, f.pod, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpACK}, 0},
		{"uplink_ingress/HBONE SYN", f.d.objs.UplinkIngress, f.uplink, packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpSYN}, 0},
		{"uplink_ingress/not a local pod", f.d.objs.UplinkIngress, f.uplink, packet{src: ap(remotePod, 40000), dst: ap(otherPodIP, 80), flags: tcpACK}, 0},
		{"uplink_egress/the ztunnel's HBONE from a pod's address", f.d.objs.UplinkEgress, f.uplink, packet{src: ap(podIP, 40000), dst: ap(remotePod, 15008), flags: tcpACK}, DefaultZtunnelMark},
		{"uplink_egress/not a local pod", f.d.objs.UplinkEgress, f.uplink, packet{src: ap(nodeIP, 40000), dst: ap(remotePod, 15008), flags: tcpACK}, 0},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			enter(b, f.ns)
			data := bb.pkt.bytes()
			var out skbCtx
			b.ResetTimer()
			if _, err := bb.prog.Run(&ebpf.RunOptions{Data: data, Context: skbCtx{Ifindex: uint32(bb.ifx), Mark: bb.mark}, ContextOut: &out, Repeat: uint32(b.N)}); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestProgramsFailClosed: whatever piece of the capture is missing, a
// captured connection is dropped and counted, never let through.
func TestProgramsFailClosed(t *testing.T) {
	f := newProgFixture(t, nil)
	s := f.d.settings()
	rule := f.d.rule(s)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	route := localRoute(lo.Attrs().Index, s.RouteTable)
	podSYN := packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}
	hboneSYN := packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpSYN}
	tests := []struct {
		name       string
		prog       *ebpf.Program
		ifindex    int
		pkt        packet
		breakIt    func() error
		repair     func() error
		wantCounts string
	}{
		{"a pod's SYN without the outbound listener", f.d.objs.PodIngress, f.pod, podSYN,
			func() error { return f.d.ClearListener(Outbound) }, func() error { return f.listen(t, Outbound) }, "redirected+1 no_listener_dropped+1"},
		{"an HBONE SYN without the HBONE listener", f.d.objs.UplinkIngress, f.uplink, hboneSYN,
			func() error { return f.d.ClearListener(HBONE) }, func() error { return f.listen(t, HBONE) }, "uplink_redirected+1 no_listener_dropped+1"},
		{"a pod's SYN without the routing rule", f.d.objs.PodIngress, f.pod, podSYN,
			func() error { return netlink.RuleDel(rule) }, func() error { return netlink.RuleAdd(rule) }, "redirected+1 route_dropped+1"},
		{"a pod's SYN without the capture table's route", f.d.objs.PodIngress, f.pod, podSYN,
			func() error { return netlink.RouteDel(route) }, func() error { return netlink.RouteAdd(route) }, "redirected+1 route_dropped+1"},
		{"an HBONE SYN without the routing rule", f.d.objs.UplinkIngress, f.uplink, hboneSYN,
			func() error { return netlink.RuleDel(rule) }, func() error { return netlink.RuleAdd(rule) }, "uplink_redirected+1 route_dropped+1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			if err := tt.breakIt(); err != nil {
				t.Fatalf("break: %v", err)
			}
			t.Cleanup(func() {
				if err := tt.repair(); err != nil {
					t.Errorf("repair: %v", err)
				}
			})
			before := f.counters(t)
			if verdict, _ := f.runTC(t, tt.prog, tt.ifindex, tt.pkt.bytes(), 0); verdict != verdictDrop {
				t.Errorf("verdict %#x, want drop", verdict)
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}

// TestUplinkEgress: an enrolled pod's IPv4 packets leave the node only as
// the ztunnel's or stamped by pod_ingress.
func TestUplinkEgress(t *testing.T) {
	f := newProgFixture(t, nil)
	fromPod := packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}
	tests := []struct {
		name        string
		pkt         packet
		mark        uint32
		wantVerdict uint32
		wantCounts  string
	}{
		{"a pod's packet that pod_ingress never saw is dropped", fromPod, 0, verdictDrop, "leak_dropped+1"},
		{"a pod's data segment that pod_ingress never saw is dropped", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpACK}, 0, verdictDrop, "leak_dropped+1"},
		{"a pod's packet with other mark bits only is dropped", fromPod, 0x4000 | DefaultRedirectMark, verdictDrop, "leak_dropped+1"},
		{"a pod's packet stamped by pod_ingress passes", fromPod, DefaultPassMark, verdictNext, ""},
		{"the ztunnel's packet from a pod's address passes", packet{src: ap(podIP, 40000), dst: ap(remotePod, 15008), flags: tcpSYN}, DefaultZtunnelMark, verdictNext, ""},
		{"a packet of an address that is no local pod's passes", packet{src: ap(otherPodIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0, verdictNext, ""},
		{"a pod's UDP stamped by pod_ingress passes", packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, DefaultPassMark, verdictNext, ""},
		{"a pod's UDP that pod_ingress never saw is dropped", packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0, verdictDrop, "leak_dropped+1"},
		{"a pod's TCP fragment that pod_ingress never saw is dropped", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), fragOffset: 10}, 0, verdictDrop, "leak_dropped+1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			before := f.counters(t)
			verdict, mark := f.runTC(t, f.d.objs.UplinkEgress, f.uplink, tt.pkt.bytes(), tt.mark)
			if verdict != tt.wantVerdict || mark != tt.mark {
				t.Errorf("verdict %#x mark %#x, want verdict %#x, mark untouched", verdict, mark, tt.wantVerdict)
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}
