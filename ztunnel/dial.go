package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"syscall"
)

// newDialer returns a dialer for the ztunnel's own sockets: marked with
// mark (SO_MARK, 0 for none) and, when src is valid, bound to src with
// IP_TRANSPARENT so the destination sees the client's address.
func newDialer(mark int, src netip.Addr) *net.Dialer {
	d := &net.Dialer{}
	d.SetMultipathTCP(false)
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	transparent := src.IsValid()
	if mark != 0 || transparent {
		d.ControlContext = func(_ context.Context, network, _ string, c syscall.RawConn) error {
			return setSockopts(network, c, mark, transparent)
		}
	}
	return d
}
