package rawtcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// Accept waits for the next connection on ln and returns it as a Conn.
// After ln is closed it returns an error for which errors.Is(err,
// net.ErrClosed); ln's deadline is honoured. Other errors (EMFILE, ...) come
// as a *net.OpError with Op "accept", as from ln.Accept.
//
// The wait is ln's own, in Go's poller: Go's listener RawConn cannot wait
// (its Read fails with EINVAL), so Accept takes the connection with
// ln.AcceptTCP, moves the socket to a new fd of its own and closes Go's.
// Go's poller thus holds each accepted socket only for a moment, and reuses
// its record for the next one: the records Go never frees number the
// Accepts in flight at once, not the connections.
func Accept(ln *net.TCPListener) (*Conn, error) {
	tc, err := ln.AcceptTCP()
	if err != nil {
		return nil, err
	}
	defer tc.Close()
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: ln.Addr(), Err: err}
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = rawDupCloexec(int(fd))
	}); err != nil {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: ln.Addr(), Err: err}
	}
	if derr != nil {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: ln.Addr(), Err: fmt.Errorf("move socket out of Go's poller: %w", os.NewSyscallError("fcntl", derr))}
	}
	// The new fd shares the socket's open file description, nonblocking
	// as Go made it; closing Go's fd leaves the connection open.
	laddr := tc.LocalAddr().(*net.TCPAddr).AddrPort()
	raddr := tc.RemoteAddr().(*net.TCPAddr).AddrPort()
	c, err := newConn(nfd, unmap(laddr), unmap(raddr))
	if err != nil {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: ln.Addr(), Err: fmt.Errorf("register with poller: %w", err)}
	}
	return c, nil
}

// unmap turns an IPv4-mapped IPv6 address (a dual-stack socket's view of an
// IPv4 peer) into the IPv4 address.
func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Listener returns a net.Listener whose Accept returns *Conn (see Accept);
// Addr and Close are ln's.
func Listener(ln *net.TCPListener) net.Listener { return listener{ln} }

type listener struct{ *net.TCPListener }

func (l listener) Accept() (net.Conn, error) {
	c, err := Accept(l.TCPListener)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Dial connects to dst, with TCP_NODELAY and the keep-alive of net.Dialer's
// defaults (15 s idle, 15 s interval, 9 probes). With mark != 0 the socket carries SO_MARK mark;
// with a valid src it is bound to src (any port) as a transparent socket
// (IP_TRANSPARENT, or IPV6_TRANSPARENT for IPv6), so src need not be a local
// address. Errors are *net.OpError with Op "dial", as net.Dialer's: a
// refused connection satisfies errors.Is(err, syscall.ECONNREFUSED), and
// when ctx ends first errors.Is(err, ctx.Err()) holds.
func Dial(ctx context.Context, dst netip.AddrPort, src netip.Addr, mark int) (*Conn, error) {
	c, err := dial(ctx, dst, src, mark)
	if err != nil {
		var srcAddr net.Addr
		if src.IsValid() {
			srcAddr = &net.TCPAddr{IP: src.AsSlice(), Zone: src.Zone()}
		}
		return nil, &net.OpError{Op: "dial", Net: "tcp", Source: srcAddr, Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	return c, nil
}

func dial(ctx context.Context, dst netip.AddrPort, src netip.Addr, mark int) (*Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	src = src.Unmap()
	if !dst.IsValid() {
		return nil, errors.New("invalid destination address")
	}
	v4 := dst.Addr().Is4()
	if src.IsValid() && src.Is4() != v4 {
		return nil, fmt.Errorf("source %s and destination %s are of different families", src, dst.Addr())
	}
	family := unix.AF_INET6
	if v4 {
		family = unix.AF_INET
	}
	fd, err := rawSocket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	ok := false
	defer func() {
		if !ok {
			rawClose(fd)
		}
	}()
	if err := setup(fd, src, mark, v4); err != nil {
		return nil, err
	}
	err = rawConnect(fd, dst)
	if err == unix.EINTR {
		// Interrupted: the connect goes on in the background (as for
		// EINPROGRESS); calling connect again would say EALREADY.
		err = unix.EINPROGRESS
	}
	switch err {
	case nil, unix.EINPROGRESS, unix.EALREADY:
	default:
		return nil, os.NewSyscallError("connect", err)
	}
	pending := err != nil
	// Register only now: an unconnected socket polls as hung up.
	p, err := getPoller()
	if err != nil {
		return nil, err
	}
	c := &Conn{fd: fd}
	if err := p.register(c); err != nil {
		return nil, fmt.Errorf("register with poller: %w", err)
	}
	ok = true // from here c owns fd
	if err := c.connected(ctx, pending); err != nil {
		c.Close()
		return nil, err
	}
	laddr, err := rawName(unix.SYS_GETSOCKNAME, fd)
	if err != nil {
		c.Close()
		return nil, os.NewSyscallError("getsockname", err)
	}
	c.laddr, c.raddr = laddr, dst
	return c, nil
}

// setup sets the socket options of Dial before connect.
func setup(fd int, src netip.Addr, mark int, v4 bool) error {
	if err := rawSetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("set TCP_NODELAY: %w", os.NewSyscallError("setsockopt", err))
	}
	// TCP keep-alive as net.Dialer sets it by default (and as Accept gets
	// it from Go's listener): probes after 15 s idle, every 15 s, 9 of them.
	for _, o := range [...]struct {
		level, opt, value int
		name              string
	}{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15, "TCP_KEEPIDLE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15, "TCP_KEEPINTVL"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9, "TCP_KEEPCNT"},
	} {
		if err := rawSetsockoptInt(fd, o.level, o.opt, o.value); err != nil {
			return fmt.Errorf("set %s: %w", o.name, os.NewSyscallError("setsockopt", err))
		}
	}
	if mark != 0 {
		if err := rawSetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
			return fmt.Errorf("set SO_MARK %#x: %w", mark, os.NewSyscallError("setsockopt", err))
		}
	}
	if !src.IsValid() {
		return nil
	}
	if v4 {
		if err := rawSetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
			return fmt.Errorf("set IP_TRANSPARENT: %w", os.NewSyscallError("setsockopt", err))
		}
	} else {
		if err := rawSetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
			return fmt.Errorf("set IPV6_TRANSPARENT: %w", os.NewSyscallError("setsockopt", err))
		}
	}
	// IP_BIND_ADDRESS_NO_PORT (level SOL_IP for both families): pick the
	// port at connect, so the 4-tuple rather than the address limits ports.
	if err := rawSetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
		return fmt.Errorf("set IP_BIND_ADDRESS_NO_PORT: %w", os.NewSyscallError("setsockopt", err))
	}
	if err := rawBind(fd, netip.AddrPortFrom(src, 0)); err != nil {
		return fmt.Errorf("bind to source %s: %w", src, os.NewSyscallError("bind", err))
	}
	return nil
}

// connected waits for a pending connect to finish (or ctx to end) and
// returns its result.
func (c *Conn) connected(ctx context.Context, pending bool) error {
	for {
		if pending {
			if err := c.wait(&c.w, ctx.Done()); err != nil {
				if err == errDone {
					return ctx.Err()
				}
				return err
			}
		}
		pending = true
		errno, err := rawGetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return os.NewSyscallError("getsockopt", err)
		}
		switch e := unix.Errno(errno); e {
		case 0:
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			continue
		default:
			return os.NewSyscallError("connect", e)
		}
		// SO_ERROR 0 may come early (a spurious wake-up); the socket has
		// a peer only once connected.
		switch _, err := rawName(unix.SYS_GETPEERNAME, c.fd); err {
		case nil:
			return nil
		case unix.ENOTCONN:
			continue
		default:
			return os.NewSyscallError("getpeername", err)
		}
	}
}
