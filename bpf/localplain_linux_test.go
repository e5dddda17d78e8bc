package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// verdictRedirect is TC_ACT_REDIRECT.
const verdictRedirect = 7

// unmeshedIP is a pod of the node that is not enrolled.
var unmeshedIP = netip.MustParseAddr("198.19.1.20")

func TestPodEgressLocalPlain(t *testing.T) {
	f := newProgFixture(t, func(c *Config) { c.CaptureLocalPlain = true })
	if err := f.d.SetLocalPod(otherPodIP, true); err != nil { // an enrolled pod of the node
		t.Fatal(err)
	}
	const redirect = DefaultRedirectMark
	tests := []struct {
		name        string
		strict      bool
		pkt         packet
		mark        uint32
		wantVerdict uint32
		wantMark    uint32
		wantCounts  string
	}{
		{"a plaintext SYN from an unmeshed pod of the node is turned to lo", false, packet{src: ap(unmeshedIP, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictRedirect, redirect, "local_plain_redirected+1"},
		{"a plaintext SYN from another node (not captured at the uplink) is turned too", false, packet{src: ap(remotePod, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictRedirect, redirect, "local_plain_redirected+1"},
		{"the ztunnel's own SYN goes to the pod", false, packet{src: ap(unmeshedIP, 40000), dst: ap(podIP, 80), flags: tcpSYN}, DefaultZtunnelMark, verdictNext, DefaultZtunnelMark, ""},
		{"a kubelet probe goes to the pod", false, packet{src: ap(nodeIP, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictNext, 0, ""},
		{"an enrolled pod's SYN (excluded from its capture) goes to the pod", false, packet{src: ap(otherPodIP, 40000), dst: ap(podIP, 22), flags: tcpSYN}, 0, verdictNext, 0, ""},
		{"an ACK no local socket owns goes to the pod", false, packet{src: ap(unmeshedIP, 40000), dst: ap(podIP, 80), flags: tcpACK}, 0, verdictNext, 0, ""},
		{"UDP goes to the pod", false, packet{src: ap(unmeshedIP, 53), dst: ap(podIP, 53), proto: unix.IPPROTO_UDP}, 0, verdictNext, 0, ""},
		{"STRICT still drops the plaintext SYN", true, packet{src: ap(unmeshedIP, 40000), dst: ap(podIP, 80), flags: tcpSYN}, 0, verdictDrop, 0, "strict_dropped+1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enter(t, f.ns)
			if err := f.d.EnrollPod(Pod{HostIfindex: f.pod, IPs: []netip.Addr{podIP}, Strict: tt.strict}); err != nil {
				t.Fatalf("EnrollPod: %v", err)
			}
			before := f.counters(t)
			in := skbCtx{Mark: tt.mark, Ifindex: uint32(f.pod)}
			var out skbCtx
			data := tt.pkt.bytes()
			dataOut := make([]byte, len(data))
			ret, err := f.d.objs.PodEgress.Run(&ebpf.RunOptions{Data: data, DataOut: dataOut, Context: in, ContextOut: &out})
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if ret != tt.wantVerdict || out.Mark != tt.wantMark {
				t.Errorf("verdict %#x mark %#x, want %#x %#x", ret, out.Mark, tt.wantVerdict, tt.wantMark)
			}
			if tt.wantVerdict == verdictRedirect && !bytes.Equal(dataOut[:6], make([]byte, 6)) {
				t.Errorf("destination MAC %x, want lo's (zero)", dataOut[:6])
			}
			if got := f.counters(t).diff(before); got != tt.wantCounts {
				t.Errorf("counters changed by %q, want %q", got, tt.wantCounts)
			}
		})
	}
}

func TestPodEgressLocalPlainIsOffByDefault(t *testing.T) {
	f := newProgFixture(t, nil)
	if err := f.d.EnrollPod(Pod{HostIfindex: f.pod, IPs: []netip.Addr{podIP}}); err != nil {
		t.Fatal(err)
	}
	verdict, mark := f.runTC(t, f.d.objs.PodEgress, f.pod, packet{src: ap(unmeshedIP, 40000), dst: ap(podIP, 80), flags: tcpSYN}.bytes(), 0)
	if verdict != verdictNext || mark != 0 {
		t.Fatalf("verdict %#x mark %#x: captured without CaptureLocalPlain", verdict, mark)
	}
}

// addUnmeshedPod adds a pod of the node that is not enrolled: veth "vun",
// 198.19.1.20, routed like the enrolled one.
func (tb *testbed) addUnmeshedPod(t *testing.T) netns.NsHandle {
	t.Helper()
	ns := newNS(t)
	enter(t, tb.node)
	ifx := addVeth(t, "vun", "eth0", &ns)
	mustRoute(t, &netlink.Route{LinkIndex: ifx, Dst: prefix("198.19.1.20/32"), Scope: netlink.SCOPE_LINK})
	inNS(t, ns, func() {
		eth0 := linkUp(t, "eth0")
		mustAddr(t, eth0, "198.19.1.20/32")
		mustRoute(t, &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: prefix("169.254.1.1/32"), Scope: netlink.SCOPE_LINK})
		mustRoute(t, &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("169.254.1.1")})
	})
	return ns
}

// TestLocalPlainCapture: plaintext from an unmeshed pod of the node to a
// PERMISSIVE pod reaches the inbound plaintext listener, which sees the
// pod's address as the destination and the client's real address, and the
// whole flow (ACKs, data both ways) keeps going through it; a STRICT pod
// drops it; without a listener it fails closed. Open turns TCP early
// demux off in the namespace: otherwise the client's ACK, matched early to
// the ztunnel's socket, is dropped by forwarding before pod_egress sees
// it.
func TestLocalPlainCapture(t *testing.T) {
	for _, tt := range []struct {
		name        string
		strict      bool
		listener    bool
		wantCapture bool
		wantCount   func(before, after Counters) bool
	}{
		{"PERMISSIVE: captured to the inbound plaintext listener", false, true, true,
			func(b, a Counters) bool {
				return a.LocalPlainRedirected > b.LocalPlainRedirected && a.LookupInboundPlain > b.LookupInboundPlain
			}},
		{"PERMISSIVE without the listener: dropped, never delivered in plaintext", false, false, false,
			func(b, a Counters) bool { return a.NoListener > b.NoListener }},
		{"STRICT: dropped at the pod's veth", true, true, false,
			func(b, a Counters) bool {
				return a.StrictDrops > b.StrictDrops && a.LocalPlainRedirected == b.LocalPlainRedirected
			}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tb := newTopology(t)
			un := tb.addUnmeshedPod(t)
			enter(t, tb.node)
			tb.cfg = testConfig(t)
			tb.cfg.CaptureLocalPlain = true
			tb.open(t)
			tb.enroll(t, tt.strict)
			if err := tb.d.SetLocalPod(podIP, true); err != nil {
				t.Fatal(err)
			}
			var plain *net.TCPListener
			if tt.listener {
				plain = tb.listen(t, InboundPlain)
			}
			app := listenIn(t, tb.pod, "198.19.1.10:80")
			before := tb.counters(t)
			client, err := dialFrom(t, un, net.Dialer{Timeout: time.Second}, ap(podIP, 80))
			after := tb.counters(t)
			if !tt.wantCount(before, after) {
				t.Errorf("counters changed by %q", after.diff(before))
			}
			nothingAccepted(t, app)
			if !tt.wantCapture {
				if err == nil {
					t.Fatal("dial succeeded, want it dropped")
				}
				return
			}
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			server := accept(t, plain)
			if got := addrPort(server.LocalAddr()); got != ap(podIP, 80) {
				t.Errorf("the listener sees destination %s, want the pod %s", got, ap(podIP, 80))
			}
			if got := addrPort(server.RemoteAddr()).Addr(); got != unmeshedIP {
				t.Errorf("the listener sees the client as %s, want %s", got, unmeshedIP)
			}
			exchange(t, client, server)
			exchange(t, client, server)
		})
	}
}
