package bpf

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Verdicts of tc programs as BPF_PROG_TEST_RUN reports them.
const (
	verdictNext = 0xffffffff // TC_ACT_UNSPEC: no opinion, the packet goes on
	verdictDrop = 2          // TC_ACT_SHOT
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
	addVeth(t, "vup", "vupp", nil)
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
	return f
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
	const redirect = DefaultRedirectMark
	tests := []struct {
		name        string
		pkt         packet
		mark        uint32
		wantVerdict uint32
		wantMark    uint32
		wantCounts  string
	}{
		{"a SYN to a pod of another node is marked for capture", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0, verdictNext, redirect, "redirected+1"},
		{"a SYN to a pod of the same node is marked for capture", packet{src: ap(podIP, 40000), dst: ap(otherPodIP, 80), flags: tcpSYN}, 0, verdictNext, redirect, "redirected+1"},
		{"mark bits outside the mask are kept", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0x4005, verdictNext, 0x4005 | redirect, "redirected+1"},
		{"a forged source address is dropped and counted", packet{src: ap(otherPodIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}, 0, verdictDrop, 0, "spoof_drops+1"},
		{"forged UDP is dropped too", packet{src: ap(remotePod, 53), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0, verdictDrop, 0, "spoof_drops+1"},
		{"UDP from the pod passes unmarked", packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}, 0, verdictNext, 0, ""},
		{"a SYN to the node's own address is not captured", packet{src: ap(podIP, 40000), dst: ap(nodeIP, 10250), flags: tcpSYN}, 0, verdictNext, 0, "excluded+1"},
		{"a SYN into an excluded CIDR is not captured", packet{src: ap(podIP, 40000), dst: ap(excludedIP, 443), flags: tcpSYN}, 0, verdictNext, 0, "excluded+1"},
		{"a SYN to an excluded port is not captured", packet{src: ap(podIP, 40000), dst: ap(remotePod, 22), flags: tcpSYN}, 0, verdictNext, 0, "excluded+1"},
		{"an ACK of a flow no local socket owns passes unmarked", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpACK}, 0, verdictNext, 0, ""},
		{"a SYN-ACK (the pod answering) is not a new connection", packet{src: ap(podIP, 80), dst: ap(remotePod, 40000), flags: tcpSYN | tcpACK}, 0, verdictNext, 0, ""},
		{"a non-first fragment passes unmarked", packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), fragOffset: 10}, 0, verdictNext, 0, ""},
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

	before := f.counters(t)
	verdict, mark := f.runTC(t, f.d.objs.PodIngress, f.pod, fromClient.bytes(), 0)
	if verdict != verdictNext || mark != DefaultRedirectMark {
		t.Errorf("established flow: verdict %#x mark %#x, want %#x %#x", verdict, mark, uint32(verdictNext), DefaultRedirectMark)
	}
	// BPF_PROG_TEST_RUN does not run at tc ingress, so the kernel refuses
	// bpf_sk_assign there; either way the lookup found the socket.
	if got := f.counters(t).diff(before); got != "assigned+1" && got != "assign_failed+1" {
		t.Errorf("established flow: counters changed by %q, want assigned+1 (or assign_failed+1 under test-run)", got)
	}

	before = f.counters(t)
	syn := packet{src: ap(netip.MustParseAddr("127.0.0.1"), 40999), dst: sAddr, flags: tcpSYN}
	verdict, mark = f.runTC(t, f.d.objs.PodIngress, f.pod, syn.bytes(), 0)
	if verdict != verdictNext || mark != DefaultRedirectMark {
		t.Errorf("SYN to a listener: verdict %#x mark %#x", verdict, mark)
	}
	if got := f.counters(t).diff(before); got != "redirected+1" {
		t.Errorf("SYN to a local listener: counters changed by %q, want redirected+1 (never assigned to a listener)", got)
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
	verdict, mark = f.runTC(t, f.d.objs.PodIngress, f.pod, reuse.bytes(), 0)
	if verdict != verdictNext || mark != DefaultRedirectMark {
		t.Errorf("SYN on a TIME_WAIT tuple: verdict %#x mark %#x", verdict, mark)
	}
	if got := f.counters(t).diff(before); got != "assigned+1" && got != "assign_failed+1" {
		t.Errorf("SYN on a TIME_WAIT tuple: counters changed by %q, want it handed to the TIME_WAIT socket", got)
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
		{"STRICT drops a plaintext SYN from a pod of another node", true, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictDrop, "strict_drops+1"},
		{"STRICT drops a SYN with only some of the ztunnel's mark bits", true, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, DefaultZtunnelMark >> 1, verdictDrop, "strict_drops+1"},
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
		name       string
		pkt        packet
		wantMark   uint32
		wantCounts string
	}{
		{"an HBONE SYN to a local pod is marked for capture", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpSYN}, DefaultRedirectMark, "uplink_redirected+1"},
		{"a plaintext SYN to a local pod is not captured (inbound plaintext is reserved)", packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, ""},
		{"an HBONE SYN to a pod that is not local passes", packet{src: ap(remotePod, 40000), dst: ap(otherPodIP, 15008), flags: tcpSYN}, 0, ""},
		{"an ACK to a local pod without a local socket passes", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpACK}, 0, ""},
		{"UDP to a local pod passes", packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), proto: unix.IPPROTO_UDP}, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			before := f.counters(t)
			verdict, mark := f.runTC(t, f.d.objs.UplinkIngress, f.uplink, tt.pkt.bytes(), 0)
			if verdict != verdictNext || mark != tt.wantMark {
				t.Errorf("verdict %#x mark %#x, want verdict %#x mark %#x", verdict, mark, uint32(verdictNext), tt.wantMark)
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
	_, mark := f.runTC(t, f.d.objs.UplinkIngress, f.uplink, pkt.bytes(), 0)
	if mark != DefaultRedirectMark {
		t.Errorf("with CaptureInboundPlain a plaintext SYN to a local pod got mark %#x, want %#x", mark, DefaultRedirectMark)
	}
	if got := f.counters(t).diff(before); got != "uplink_redirected+1" {
		t.Errorf("counters changed by %q", got)
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
	}{
		{"pod_ingress/SYN captured", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}},
		{"pod_ingress/ACK of a forwarded flow", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 40000), dst: ap(remotePod, 8080), flags: tcpACK}},
		{"pod_ingress/UDP", f.d.objs.PodIngress, f.pod, packet{src: ap(podIP, 5353), dst: ap(remotePod, 53), proto: unix.IPPROTO_UDP}},
		{"pod_ingress/spoofed", f.d.objs.PodIngress, f.pod, packet{src: ap(otherPodIP, 40000), dst: ap(remotePod, 8080), flags: tcpSYN}},
		{"pod_egress/STRICT drop", f.d.objs.PodEgress, f.pod, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}},
		{"pod_egress/ACK", f.d.objs.PodEgress, f.pod, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpACK}},
		{"uplink_ingress/HBONE SYN", f.d.objs.UplinkIngress, f.uplink, packet{src: ap(remotePod, 40000), dst: ap(podIP, 15008), flags: tcpSYN}},
		{"uplink_ingress/not a local pod", f.d.objs.UplinkIngress, f.uplink, packet{src: ap(remotePod, 40000), dst: ap(otherPodIP, 80), flags: tcpACK}},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			enter(b, f.ns)
			data := bb.pkt.bytes()
			var out skbCtx
			b.ResetTimer()
			if _, err := bb.prog.Run(&ebpf.RunOptions{Data: data, Context: skbCtx{Ifindex: uint32(bb.ifx)}, ContextOut: &out, Repeat: uint32(b.N)}); err != nil {
				b.Fatal(err)
			}
		})
	}
}
