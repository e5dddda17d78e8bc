//go:build !linux

package ztunnel

import (
	"context"
	"net"
	"net/netip"
)

// rawListener returns ln: sockets outside Go's poller are Linux-only.
func rawListener(ln net.Listener) (net.Listener, error) { return ln, nil }

// dialTCP connects to dst from src with Go's dialer.
func dialTCP(ctx context.Context, mark int, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	return newDialer(mark, src).DialContext(ctx, "tcp", dst.String())
}
