//go:build !linux

package rawtcp

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// Conn is a TCP connection outside Go's poller; only Linux has them.
type Conn struct{}

var errUnsupported = errors.ErrUnsupported

// Listener accepts Conns; only Linux has them.
type Listener struct{}

// Listen is not supported on this platform.
func Listen(ln *net.TCPListener) (*Listener, error) {
	return nil, &net.OpError{Op: "listen", Net: "tcp", Addr: ln.Addr(), Err: errUnsupported}
}

func (l *Listener) Accept() (net.Conn, error)   { return nil, errUnsupported }
func (l *Listener) AcceptConn() (*Conn, error)  { return nil, errUnsupported }
func (l *Listener) Close() error                { return errUnsupported }
func (l *Listener) Addr() net.Addr              { return nil }
func (l *Listener) SetDeadline(time.Time) error { return errUnsupported }

// Dial is not supported on this platform.
func Dial(ctx context.Context, dst netip.AddrPort, src netip.Addr, mark int) (*Conn, error) {
	return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: errUnsupported}
}

func (c *Conn) Read([]byte) (int, error)              { return 0, errUnsupported }
func (c *Conn) TryRead([]byte) (int, error)           { return 0, errUnsupported }
func (c *Conn) Write([]byte) (int, error)             { return 0, errUnsupported }
func (c *Conn) WaitRead(func()) bool                  { return false }
func (c *Conn) Close() error                          { return errUnsupported }
func (c *Conn) CloseWrite() error                     { return errUnsupported }
func (c *Conn) SetLinger(int) error                   { return errUnsupported }
func (c *Conn) LocalAddr() net.Addr                   { return nil }
func (c *Conn) RemoteAddr() net.Addr                  { return nil }
func (c *Conn) LocalAddrPort() netip.AddrPort         { return netip.AddrPort{} }
func (c *Conn) RemoteAddrPort() netip.AddrPort        { return netip.AddrPort{} }
func (c *Conn) SetDeadline(time.Time) error           { return errUnsupported }
func (c *Conn) SetReadDeadline(time.Time) error       { return errUnsupported }
func (c *Conn) SetWriteDeadline(time.Time) error      { return errUnsupported }
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return nil, errUnsupported }

var _ net.Conn = (*Conn)(nil)
