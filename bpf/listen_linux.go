package bpf

import (
	"context"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// ListenConfig returns the listen configuration the ztunnel's capture
// listeners need: IP_TRANSPARENT (an accepted socket's local address is the
// connection's original destination, whatever address it was), SO_MARK set
// to mark when it is non-zero (sockets accepted from the listener inherit
// it, which STRICT recognises), and no MPTCP (Go listens with MPTCP by
// default, and MPTCP sockets cannot enter a SOCKMAP).
func ListenConfig(mark uint32) net.ListenConfig {
	lc := net.ListenConfig{
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); serr != nil {
					return
				}
				if mark != 0 {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
				}
			}); err != nil {
				return err
			}
			return serr
		},
	}
	lc.SetMultipathTCP(false)
	return lc
}

// Listen listens on address (host:port, TCP, IPv4) with ListenConfig(mark).
func Listen(ctx context.Context, address string, mark uint32) (net.Listener, error) {
	lc := ListenConfig(mark)
	return lc.Listen(ctx, "tcp4", address)
}
