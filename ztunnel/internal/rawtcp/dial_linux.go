package rawtcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Listener accepts connections of a listening socket as Conns: with
// accept4 on the socket, which waits for them on this package's poller,
// as Conns do for data. Go's poller holds no record of it nor of the
// connections, and an Accept costs one system call per connection, plus
// its options (TCP_NODELAY, and the keep-alive of Go's listeners: 15 s
// idle, 15 s interval, 9 probes) and getsockname for its local address:
// for a connection accepted on a transparent socket, the original
// destination.
type Listener struct {
	c    *Conn // the listening socket, registered with the poller
	addr net.Addr
	mu   sync.Mutex // one Accept at a time: a side of c has one waiter
}

// Listen takes over ln's listening socket: the returned Listener holds a
// descriptor of its own for it, with every option ln's socket has
// (IP_TRANSPARENT, SO_MARK, ...) and every reference the kernel keeps to
// it (a SOCKMAP's), and ln is closed. The socket closes with the
// Listener. On failure ln is left as it was.
func Listen(ln *net.TCPListener) (*Listener, error) {
	fail := func(err error) (*Listener, error) {
		return nil, &net.OpError{Op: "listen", Net: "tcp", Addr: ln.Addr(), Err: err}
	}
	rc, err := ln.SyscallConn()
	if err != nil {
		return fail(err)
	}
	fd := -1
	var derr error
	if err := rc.Control(func(lfd uintptr) { fd, derr = rawDupCloexec(int(lfd)) }); err != nil {
		return fail(err)
	}
	if derr != nil {
		return fail(fmt.Errorf("take the socket from Go's listener: %w", os.NewSyscallError("fcntl", derr)))
	}
	// The descriptor shares the socket's open file description,
	// nonblocking as Go made it.
	addr := ln.Addr()
	c, err := newConn(fd, addr.(*net.TCPAddr).AddrPort(), netip.AddrPort{})
	if err != nil {
		return fail(fmt.Errorf("register with poller: %w", err))
	}
	// Go's descriptor goes, and its record in Go's poller with it; the
	// socket stays open by c's.
	ln.Close()
	return &Listener{c: c, addr: addr}, nil
}

// Accept waits for the next connection and returns it as a *Conn. After
// Close it returns an error for which errors.Is(err, net.ErrClosed);
// after the deadline (SetDeadline) one for which errors.Is(err,
// os.ErrDeadlineExceeded). Other errors (EMFILE, ...) come as a
// *net.OpError with Op "accept", as from Go's listeners; the connection
// stays queued for the next Accept.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.AcceptConn()
	if err != nil {
		return nil, err // not c: a nil *Conn would be a non-nil net.Conn
	}
	return c, nil
}

// AcceptConn is Accept returning a *Conn.
func (l *Listener) AcceptConn() (*Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	lc := l.c
	if !lc.incref() {
		return nil, l.opError(net.ErrClosed)
	}
	defer lc.decref()
	for {
		if err := lc.check(&lc.r); err != nil {
			return nil, l.opError(err)
		}
		var sa rawSockaddr
		fd, err := rawAccept4(lc.fd, &sa)
		switch err {
		case nil:
			c, err := accepted(fd, sa.addrPort())
			if err != nil {
				return nil, l.opError(err)
			}
			return c, nil
		case unix.EINTR, unix.ECONNABORTED:
			// ECONNABORTED: the connection was reset while queued; take
			// the next one, as Go's listeners do.
			continue
		case unix.EAGAIN:
			if err := lc.wait(&lc.r, nil); err != nil {
				return nil, l.opError(err)
			}
			continue
		}
		return nil, l.opError(os.NewSyscallError("accept4", err))
	}
}

// accepted sets up the socket fd accepted from raddr and registers it;
// on failure it closes fd.
func accepted(fd int, raddr netip.AddrPort) (*Conn, error) {
	laddr, err := rawName(unix.SYS_GETSOCKNAME, fd)
	if err == nil {
		err = setTCPOptions(fd)
	} else {
		err = os.NewSyscallError("getsockname", err)
	}
	if err != nil {
		rawClose(fd)
		return nil, err
	}
	c, err := newConn(fd, laddr, raddr)
	if err != nil {
		return nil, fmt.Errorf("register with poller: %w", err)
	}
	return c, nil
}

func (l *Listener) opError(err error) error {
	return &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: err}
}

// Close closes the listening socket; an Accept waiting now returns an
// error for which errors.Is(err, net.ErrClosed), and so does a second
// Close.
func (l *Listener) Close() error {
	if err := l.c.Close(); err != nil {
		return &net.OpError{Op: "close", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	}
	return nil
}

// Addr returns the listening address, as Go's listener had it.
func (l *Listener) Addr() net.Addr { return l.addr }

// SetDeadline sets the time after which Accept fails with an error for
// which errors.Is(err, os.ErrDeadlineExceeded); a zero t clears it. It
// also affects an Accept waiting now.
func (l *Listener) SetDeadline(t time.Time) error {
	if err := l.c.setDeadline(&l.c.r, t); err != nil {
		return &net.OpError{Op: "set", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	}
	return nil
}

var _ net.Listener = (*Listener)(nil)

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

// setTCPOptions sets what Dial and Accept set on every socket: TCP_NODELAY
// and TCP keep-alive as Go's dialers and listeners set it by default:
// probes after 15 s idle, every 15 s, 9 of them.
func setTCPOptions(fd int) error {
	if err := rawSetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("set TCP_NODELAY: %w", os.NewSyscallError("setsockopt", err))
	}
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
	return nil
}

// setup sets the socket options of Dial before connect.
func setup(fd int, src netip.Addr, mark int, v4 bool) error {
	if err := setTCPOptions(fd); err != nil {
		return err
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
