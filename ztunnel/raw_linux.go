package ztunnel

import (
	"context"
	"net"
	"net/netip"

	"github.com/mantlet/mantlet/ztunnel/internal/rawtcp"
)

// rawListener makes a TCP listener's connections sockets outside Go's
// poller (rawtcp): an idle flow between them and an HBONE stream keeps no
// goroutine, and closing them gives all their memory back. Go's poller
// never frees its record of a socket (about 550 bytes), nor the runtime
// a goroutine's (about 480), so an agent that once held 10,000 flows
// would keep 10 MB for good. The listener's socket moves to rawtcp, which
// accepts with accept4 on its own poller, and ln is closed; other
// listeners are left as they are.
func rawListener(ln net.Listener) (net.Listener, error) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return ln, nil
	}
	// Not l itself on failure: a nil *rawtcp.Listener would be a non-nil
	// net.Listener.
	l, err := rawtcp.Listen(tl)
	if err != nil {
		return nil, err
	}
	return l, nil
}

// dialTCP connects to dst from src (if valid, with IP_TRANSPARENT), with
// SO_MARK mark (if not 0), as a socket outside Go's poller (rawListener).
func dialTCP(ctx context.Context, mark int, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	// Not c itself on failure: a nil *rawtcp.Conn would be a non-nil net.Conn.
	c, err := rawtcp.Dial(ctx, dst, src, mark)
	if err != nil {
		return nil, err
	}
	return c, nil
}
