package rawtcp

import (
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls on this package's sockets are raw (unix.RawSyscall):
// unlike Go's ordinary Syscall, a raw call does not tell the scheduler
// that its goroutine entered the kernel, so its P stays with it, and
// sysmon never hands that P to another thread (starting a new one if
// none is idle) while other goroutines wait. Every thread so started
// stays for good with its stacks (about 48 KiB), and a burst of
// connections started several.
//
// Raw is right only for calls that cannot sleep for long, and these do
// not: every socket of this package is nonblocking, so read, write,
// connect and accept4 return EAGAIN or EINPROGRESS instead of waiting;
// epoll_pwait is called with a zero timeout; socket, bind (to port 0,
// with IP_BIND_ADDRESS_NO_PORT: no port search), setsockopt, getsockopt,
// getsockname, getpeername, shutdown, fcntl and epoll_ctl only take short
// kernel locks. The exception is close of a socket whose SO_LINGER has a
// positive time: it waits, nonblocking or not, until its data is sent or
// the time runs out; Conn.Close uses the ordinary call then
// (closeLingering).
//
// Under the race detector read and write go through x/sys/unix's
// ordinary wrappers, which tell the detector that what one goroutine
// wrote to a descriptor happens before what another reads from it
// (rawio_race_linux.go).

// errnoErr returns e as an error, nil for 0.
func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func rawRead(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawWrite is write(2), not send(2): a write to a reset connection fails
// with EPIPE (the runtime ignores SIGPIPE for descriptors other than 1
// and 2), as Go's sockets do, and what is written shows in the process's
// write accounting (wchar of /proc/<pid>/io).
func rawWrite(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawClose closes fd, which must not be a socket with a positive
// SO_LINGER time (see closeLingering).
func rawClose(fd int) error {
	_, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
	return errnoErr(e)
}

func rawSocket(domain, typ, proto int) (int, error) {
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(domain), uintptr(typ), uintptr(proto))
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

func rawSetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	return errnoErr(e)
}

func rawGetsockoptInt(fd, level, opt int) (int, error) {
	var v int32
	l := uint32(4)
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, e
	}
	return int(v), nil
}

func rawSetsockoptLinger(fd int, l *unix.Linger) error {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(l)), unix.SizeofLinger, 0)
	return errnoErr(e)
}

func rawGetsockoptLinger(fd int) (unix.Linger, error) {
	var v unix.Linger
	l := uint32(unix.SizeofLinger)
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&l)), 0)
	return v, errnoErr(e)
}

func rawShutdown(fd, how int) error {
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0)
	return errnoErr(e)
}

func rawEpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	return errnoErr(e)
}

// rawEpollPoll takes the events that are ready, without waiting
// (epoll_pwait with a zero timeout, the call every architecture has).
func rawEpollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawSockaddr is a socket address in the kernel's layout, large enough
// for both families.
type rawSockaddr struct {
	sa unix.RawSockaddrInet6
}

// set fills r with ap and returns its length.
func (r *rawSockaddr) set(ap netip.AddrPort) uintptr {
	port := ap.Port()
	if ap.Addr().Is4() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.sa))
		sa.Family = unix.AF_INET
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		sa.Addr = ap.Addr().As4()
		return unix.SizeofSockaddrInet4
	}
	sa := &r.sa
	sa.Family = unix.AF_INET6
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(port>>8), byte(port)
	sa.Addr = ap.Addr().As16()
	if z := ap.Addr().Zone(); z != "" {
		if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		}
	}
	return unix.SizeofSockaddrInet6
}

// addrPort returns the address in r (the zero AddrPort if of another
// family). A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d:
// they are unmapped.
func (r *rawSockaddr) addrPort() netip.AddrPort {
	switch r.sa.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.sa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		sa := &r.sa
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		a := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			if ifi, err := net.InterfaceByIndex(int(sa.Scope_id)); err == nil {
				a = a.WithZone(ifi.Name)
			}
		}
		return netip.AddrPortFrom(a.Unmap(), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

func rawConnect(fd int, dst netip.AddrPort) error {
	var sa rawSockaddr
	l := sa.set(dst)
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), l)
	return errnoErr(e)
}

func rawBind(fd int, src netip.AddrPort) error {
	var sa rawSockaddr
	l := sa.set(src)
	_, _, e := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa)), l)
	return errnoErr(e)
}

// rawName calls getsockname or getpeername (call) on fd.
func rawName(call uintptr, fd int) (netip.AddrPort, error) {
	var sa rawSockaddr
	l := uint32(unsafe.Sizeof(sa))
	_, _, e := unix.RawSyscall(call, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return netip.AddrPort{}, e
	}
	return sa.addrPort(), nil
}

// rawAccept4 accepts a connection on the listening socket fd, as a
// nonblocking, close-on-exec socket, and puts its peer's address in sa.
func rawAccept4(fd int, sa *rawSockaddr) (int, error) {
	l := uint32(unsafe.Sizeof(*sa))
	nfd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(sa)), uintptr(unsafe.Pointer(&l)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(nfd), nil
}

func rawDupCloexec(fd int) (int, error) {
	nfd, _, e := unix.RawSyscall(unix.SYS_FCNTL, uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if e != 0 {
		return -1, e
	}
	return int(nfd), nil
}
