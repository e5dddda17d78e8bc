//go:build linux

package testbed

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestControlPlaneIsReachedFromNodesAndPodsOverTheUnderlay(t *testing.T) {
	spec := SimpleSpec(2, 1, "default")
	spec.ControlPlane = true
	tb := newTestbed(t, spec)
	cp := tb.ControlPlane()
	addr := netip.AddrPortFrom(cp.IP, 6443)
	l, err := cp.Listen(context.Background(), "tcp", addr.String())
	if err != nil {
		t.Fatalf("listen in the control plane: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	type dialFunc func(ctx context.Context, network, address string) (net.Conn, error)
	// A node reaches it from its node IP, a pod from its pod IP (the
	// control plane routes the pod CIDRs back via the nodes).
	tests := []struct {
		from string
		dial dialFunc
		ip   netip.Addr
	}{
		{"node1", tb.Node("node1").Dial, tb.Node("node1").IP},
		{"node2", tb.Node("node2").Dial, tb.Node("node2").IP},
		{"pod-1-1", tb.Pod("pod-1-1").Dial, tb.Pod("pod-1-1").IP},
		{"pod-2-1", tb.Pod("pod-2-1").Dial, tb.Pod("pod-2-1").IP},
	}
	for _, tt := range tests {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := tt.dial(ctx, "tcp", addr.String())
		cancel()
		if err != nil {
			t.Errorf("%s -> control plane %s: %v", tt.from, addr, err)
			continue
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if peer, perr := netip.ParseAddrPort(strings.TrimSpace(line)); err != nil || perr != nil || peer.Addr() != tt.ip {
			t.Errorf("%s -> control plane: it saw %q (%v), want %s", tt.from, line, err, tt.ip)
		}
	}
}
