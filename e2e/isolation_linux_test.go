package e2e

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// TestUnmeshedAndOptedOutPodsAreNotCaptured sends a marker from a pod of
// an unmeshed namespace and from a pod that opted out of a meshed one, to
// a pod of the other node: the marker crosses the underlay in clear, to
// the application's port, and neither node's data path counts a capture.
func TestUnmeshedAndOptedOutPodsAreNotCaptured(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "meshed", Namespace: "shop"},
				{Name: "legacy", Namespace: "plain"},
				{Name: "optout", Namespace: "shop", Annotations: map[string]string{meshed: "disabled"}},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "target", Namespace: "plain"}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{})
	srv := echo(t, m, "target", appPort)
	for _, tc := range []struct{ name, pod string }{
		{"a pod in an unmeshed namespace", "legacy"},
		{"a pod opted out of a meshed namespace", "optout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before1, before2 := counters(t, m, "node1"), counters(t, m, "node2")
			marker := newMarker(t)
			stop := capture(t, m)
			c := dial(t, m, tc.pod, srv.Addr)
			ping(t, c, marker)
			c.Close()
			pkts := stop()
			if !testbed.Contains(pkts, []byte(marker)) {
				t.Error("the marker did not cross the underlay in clear")
			}
			src := m.Pod(tc.pod).IP
			if s := syns(pkts, srv.Addr); len(s) != 1 || s[0].Src.Addr() != src {
				t.Errorf("connection attempts to %s on the underlay: %+v; want one, from %s", srv.Addr, s, src)
			}
			if s := syns(pkts, netip.AddrPortFrom(srv.Addr.Addr(), meshtest.HBONEPort)); len(s) > 0 {
				t.Errorf("%d HBONE connection attempts on the underlay, want none", len(s))
			}
			if after := counters(t, m, "node1"); after != before1 {
				t.Errorf("node1 counters moved: %+v -> %+v", before1, after)
			}
			if after := counters(t, m, "node2"); after != before2 {
				t.Errorf("node2 counters moved: %+v -> %+v", before2, after)
			}
		})
	}
	// The same path from a meshed pod is captured: the checks above can
	// see a capture when there is one.
	before := counters(t, m, "node1")
	ping(t, dial(t, m, "meshed", srv.Addr), "hello")
	if after := counters(t, m, "node1"); after.LookupOutbound != before.LookupOutbound+1 {
		t.Errorf("a meshed pod's connection was not captured: %+v -> %+v", before, after)
	}
}

// TestAPodForgingAnotherPodsIPIsDroppedAndCounted makes a meshed pod send
// connection attempts from the address of another pod (a pod with
// CAP_NET_ADMIN can do that with IP_TRANSPARENT): its node drops them at the pod's veth and counts
// them, whether the forged address belongs to a pod of the same node or of
// another; the pod's own address still works.
func TestAPodForgingAnotherPodsIPIsDroppedAndCounted(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "forger", Namespace: "shop", ServiceAccount: "forger"},
				{Name: "victim", Namespace: "shop", ServiceAccount: "admin"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop"},
				{Name: "remote", Namespace: "shop", ServiceAccount: "admin"},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{})
	srv := echo(t, m, "server", appPort)
	forger := m.Pod("forger")
	for _, tc := range []struct {
		name   string
		source netip.Addr
	}{
		{"the address of a pod of the same node", m.Pod("victim").IP},
		{"the address of a pod of another node", m.Pod("remote").IP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := counters(t, m, "node1")
			stop := capture(t, m)
			err := dialFrom(forger, tc.source, srv.Addr, dropWait)
			pkts := stop()
			if err == nil {
				t.Fatalf("a connection from %s (forged) to %s was made", tc.source, srv.Addr)
			}
			if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("forged connection failed with %v; want a timeout (its SYN dropped)", err)
			}
			after := counters(t, m, "node1")
			if after.SpoofDrops <= before.SpoofDrops {
				t.Errorf("node1 counted no spoofed packet: %d -> %d", before.SpoofDrops, after.SpoofDrops)
			}
			if after.LookupOutbound != before.LookupOutbound {
				t.Errorf("node1 handed a forged connection to the ztunnel (%d -> %d)", before.LookupOutbound, after.LookupOutbound)
			}
			for _, p := range pkts {
				if p.Src.Addr() == tc.source && p.Proto == testbed.ProtoTCP {
					t.Errorf("a packet from the forged address crossed the underlay: %s -> %s %s", p.Src, p.Dst, p.Flags)
				}
			}
		})
	}
	t.Run("its own address", func(t *testing.T) {
		if err := dialFrom(forger, forger.IP, srv.Addr, 5*time.Second); err != nil {
			t.Fatalf("from its own address: %v", err)
		}
	})
}

// dialFrom connects from inside pod's namespace to dst with the source
// address src, which need not be the pod's, and closes the connection at
// once. IP_TRANSPARENT (root in the pod) allows both the bind and the
// route lookup from a foreign address; IP_FREEBIND would allow only the
// bind.
func dialFrom(pod *testbed.Pod, src netip.Addr, dst netip.AddrPort, timeout time.Duration) error {
	return pod.Do(func() error {
		d := net.Dialer{
			Timeout:   timeout,
			LocalAddr: &net.TCPAddr{IP: src.AsSlice()},
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				}); err != nil {
					return err
				}
				return serr
			},
		}
		c, err := d.Dial("tcp4", dst.String())
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// TestStrictDropsPlaintextFromUnmeshedPodsAndPermissiveLetsItPass runs
// agents with --mtls-mode STRICT and a namespace annotated PERMISSIVE.
// Plaintext from an unmeshed pod of the same node to a STRICT pod is
// dropped (and counted); from another node it is captured to the
// destination's ztunnel, which refuses it (accept, then close, with a
// strict_plaintext refusal in its log); to a PERMISSIVE pod it passes. Meshed
// clients (through the ztunnel) and the node itself (kubelet probes) still
// reach the STRICT pod.
func TestStrictDropsPlaintextFromUnmeshedPodsAndPermissiveLetsItPass(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "legacy", Namespace: "plain"},
				{Name: "client", Namespace: "vault"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "strict", Namespace: "vault"},
				{Name: "permissive", Namespace: "open"},
				{Name: "neighbour", Namespace: "plain"},
			}},
		},
		Namespaces: map[string]map[string]string{
			"vault": meshedNS,
			"open":  {meshed: "enabled", meshtest.MTLSAnnotation: "PERMISSIVE"},
		},
	}
	m := startMesh(t, spec, meshtest.Options{MTLSMode: "STRICT"})
	strict, permissive := echo(t, m, "strict", appPort), echo(t, m, "permissive", appPort)
	node2 := m.Node("node2")
	for _, tc := range []struct {
		name   string
		dial   func(dst netip.AddrPort, timeout time.Duration) (net.Conn, error)
		dst    *meshtest.Echo
		passes bool
		// refuser is "ztunnel" when node2's ztunnel accepts and closes the
		// connection, "kernel" when pod_egress drops its SYN.
		refuser string
	}{
		{"STRICT refuses an unmeshed pod of another node", podDialer(m, "legacy"), strict, false, "ztunnel"},
		{"STRICT drops an unmeshed pod of the same node", podDialer(m, "neighbour"), strict, false, "kernel"},
		{"STRICT lets a meshed pod through its ztunnel", podDialer(m, "client"), strict, true, ""},
		{"STRICT lets the node's own probes through", func(dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			return node2.Dial(ctx, "tcp4", dst.String())
		}, strict, true, ""},
		{"PERMISSIVE lets an unmeshed pod of another node pass", podDialer(m, "legacy"), permissive, true, ""},
		{"PERMISSIVE lets an unmeshed pod of the same node pass", podDialer(m, "neighbour"), permissive, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := counters(t, m, "node2")
			timeout := 5 * time.Second
			if !tc.passes {
				timeout = dropWait
			}
			c, err := tc.dial(tc.dst.Addr, timeout)
			after := counters(t, m, "node2")
			if !tc.passes {
				if tc.refuser == "ztunnel" {
					// Captured from the uplink: node2's ztunnel accepts, then
					// resets without an answer. The reset may beat the
					// client's connect() to returning.
					switch {
					case err != nil && !errors.Is(err, syscall.ECONNRESET):
						t.Fatalf("connection to %s: %v; want it accepted by node2's ztunnel, then reset", tc.dst.Addr, err)
					case err == nil:
						defer c.Close()
						_ = c.SetDeadline(time.Now().Add(5 * time.Second))
						// The reset is reported once, by the first call after
						// it arrived: the write when it beat the write (the
						// read then sees the end), else the read.
						_, werr := c.Write([]byte("hello"))
						n, rerr := c.Read(make([]byte, 1))
						reset := errors.Is(werr, syscall.ECONNRESET) || errors.Is(werr, syscall.EPIPE) || errors.Is(rerr, syscall.ECONNRESET)
						if n > 0 || !reset {
							t.Fatalf("plaintext connection to %s: write %v, read %d bytes, %v; want a reset without an answer", tc.dst.Addr, werr, n, rerr)
						}
					}
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					if _, err := m.WaitFlow(ctx, "node2", func(f meshtest.Flow) bool {
						return f.Direction == "inbound_plaintext" && f.Dst == tc.dst.Addr && f.Flag == "strict_plaintext"
					}); err != nil {
						t.Error(err)
					}
					return
				}
				if err == nil {
					c.Close()
					t.Fatalf("plaintext connection to %s was made", tc.dst.Addr)
				}
				if after.StrictDrops <= before.StrictDrops {
					t.Errorf("node2 counted no STRICT drop (%d -> %d); the connection failed with %v", before.StrictDrops, after.StrictDrops, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("connection to %s: %v", tc.dst.Addr, err)
			}
			defer c.Close()
			ping(t, c, "hello")
			if after.StrictDrops != before.StrictDrops {
				t.Errorf("node2 counted a STRICT drop (%d -> %d) for a connection that passed", before.StrictDrops, after.StrictDrops)
			}
		})
	}
}

// podDialer returns a function that dials from pod.
func podDialer(m *meshtest.Mesh, pod string) func(netip.AddrPort, time.Duration) (net.Conn, error) {
	return func(dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return m.Dial(ctx, pod, dst)
	}
}
