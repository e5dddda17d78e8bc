package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/mantlet/mantlet/internal/privtest"
	"golang.org/x/sys/unix"
)

func TestDialerMarksAndBindsTransparently(t *testing.T) {
	privtest.Require(t) // SO_MARK and IP_TRANSPARENT need CAP_NET_ADMIN
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// 127.0.5.5 stands for a client pod's IP: bound transparently.
	src := netip.MustParseAddr("127.0.5.5")
	c, err := newDialer(0x4d4, src).DialContext(context.Background(), "tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	if got := peer.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); got != src {
		t.Fatalf("server saw the connection from %s, want %s", got, src)
	}
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var mark, transparent int
	raw.Control(func(fd uintptr) {
		mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK)
		transparent, _ = unix.GetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT)
	})
	if mark != 0x4d4 || transparent != 1 {
		t.Fatalf("SO_MARK %#x, IP_TRANSPARENT %d; want 0x4d4, 1", mark, transparent)
	}
}
