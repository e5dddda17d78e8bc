package ztunnel

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// setSockopts sets SO_MARK and IP_TRANSPARENT (both need CAP_NET_ADMIN)
// before the socket is bound.
func setSockopts(network string, c syscall.RawConn, mark int, transparent bool) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if mark != 0 {
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
				serr = fmt.Errorf("ztunnel: set SO_MARK %#x: %w", mark, err)
				return
			}
		}
		if transparent {
			// Bound to the client's IP with port 0: let connect() pick the
			// port by the full 4-tuple instead of bind() searching for a
			// port free on that IP (slow with many TIME_WAIT sockets).
			_ = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			if err := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
				serr = fmt.Errorf("ztunnel: set IP_TRANSPARENT: %w", err)
				return
			}
			if network == "tcp6" {
				if err := unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
					serr = fmt.Errorf("ztunnel: set IPV6_TRANSPARENT: %w", err)
				}
			}
		}
	})
	if err != nil {
		return fmt.Errorf("ztunnel: socket options: %w", err)
	}
	return serr
}
