package rawtcp

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// side is the readiness and waiting state of one direction of a Conn.
type side struct {
	ch      chan struct{} // from waitChans while a goroutine blocks on this side
	timer   *time.Timer   // only while a future deadline is set
	seq     uint32        // deadline generation: a timer of an older one is ignored
	ready   bool          // token: an event arrived that no waiter consumed yet
	expired bool          // the deadline has passed
	waiting bool          // a goroutine waits on ch
}

// Conn is one nonblocking TCP socket registered, edge-triggered, with the
// package's poller instead of Go's. It implements net.Conn; Read and Write
// block their goroutine (waiting on the package's poller), and WaitRead
// waits without a goroutine.
//
// A Conn holds no goroutine, no timer (unless a deadline is set) and no
// channel (but while a goroutine blocks in it); after Close it is
// ordinary garbage.
type Conn struct {
	fd    int
	laddr netip.AddrPort
	raddr netip.AddrPort

	rl, wl sync.Mutex // serialise Reads and Writes, as Go's net.Conn does

	mu       sync.Mutex
	refs     int32 // references on fd: syscalls in flight, plus one held by Close
	closed   bool
	fdClosed bool
	lingers  bool // SO_LINGER may have a positive time: closeFD must not be raw
	r, w     side
	readFn   func() // pending WaitRead callback

	// Guarded by the poller's mutex.
	idx        int32
	gen        uint32
	registered bool
	noRead     bool // the read side is not watched (SetReadInterest)
}

// SetReadInterest stops (false) or starts again (true) the poller's watch
// of the socket's read side; writes are watched either way. A caller that
// reads the socket through another descriptor in Go's poller for a while
// (a busy flow) thus saves rawtcp's poller a wake-up per packet. Turned
// on again, a readiness that came meanwhile is reported as an event.
func (c *Conn) SetReadInterest(on bool) error {
	if !c.incref() {
		return c.opError("set", net.ErrClosed)
	}
	defer c.decref()
	p, err := getPoller()
	if err != nil {
		return err
	}
	return p.setReadInterest(c, on)
}

// newConn registers the connected socket fd with the poller. On failure it
// closes fd.
func newConn(fd int, laddr, raddr netip.AddrPort) (*Conn, error) {
	p, err := getPoller()
	if err != nil {
		rawClose(fd)
		return nil, err
	}
	c := &Conn{fd: fd, laddr: laddr, raddr: raddr}
	if err := p.register(c); err != nil {
		rawClose(fd)
		return nil, err
	}
	return c, nil
}

// ready records readiness events (called by the poller goroutine).
func (c *Conn) ready(read, write bool) {
	var fn func()
	c.mu.Lock()
	if read {
		if c.readFn != nil {
			// The callback consumes this readiness; a goroutine blocked
			// in Read as well (a caller's mistake) still gets it.
			fn, c.readFn = c.readFn, nil
			c.r.ready = c.r.waiting
		} else {
			c.r.ready = true
		}
		c.r.wake()
	}
	if write {
		c.w.ready = true
		c.w.wake()
	}
	c.mu.Unlock()
	if fn != nil {
		fn()
	}
}

// wake signals the goroutine waiting on s, if any. Called with c.mu held.
func (s *side) wake() {
	if s.waiting {
		select {
		case s.ch <- struct{}{}:
		default:
		}
	}
}

// closeSide wakes s's waiter and stops its timer. Called with c.mu held.
func (s *side) closeSide() {
	s.wake()
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
}

// incref takes a reference on the fd for a syscall, or fails once the Conn
// is closed.
func (c *Conn) incref() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.refs++
	return true
}

// decref drops a reference; the last one after Close closes the fd.
func (c *Conn) decref() {
	c.mu.Lock()
	c.refs--
	last := c.closed && c.refs == 0 && !c.fdClosed
	if last {
		c.fdClosed = true
	}
	lingers := c.lingers
	c.mu.Unlock()
	if last {
		closeFD(c.fd, lingers)
	}
}

// closeFD closes fd, raw (sys_linux.go) unless lingers says SO_LINGER may
// have a positive time and getsockopt confirms it: close then waits until
// the socket's data is sent, up to that time, so it is the ordinary call
// that lets the scheduler run other goroutines meanwhile.
func closeFD(fd int, lingers bool) {
	if lingers {
		if l, err := rawGetsockoptLinger(fd); err != nil || l.Onoff != 0 && l.Linger > 0 {
			unix.Close(fd)
			return
		}
	}
	rawClose(fd)
}

// waitChans holds the channels that goroutines blocked in a Conn wait on:
// a channel is taken for one wait and given back after it, so an open
// Conn keeps none (100-odd bytes each).
var waitChans = sync.Pool{New: func() any { return make(chan struct{}, 1) }}

// wait blocks until s has a readiness token (consuming it), the deadline
// passes, the Conn is closed, or done is closed (nil: never).
func (c *Conn) wait(s *side, done <-chan struct{}) error {
	c.mu.Lock()
	for {
		switch {
		case c.closed:
			c.mu.Unlock()
			return net.ErrClosed
		case s.expired:
			c.mu.Unlock()
			return os.ErrDeadlineExceeded
		case s.ready:
			s.ready = false
			c.mu.Unlock()
			return nil
		}
		// The readiness itself is the token above, kept under c.mu: the
		// channel only wakes this goroutine, and is given back once no
		// wake (which sends only while s.waiting, under c.mu) can reach
		// it, emptied of a wake this goroutine did not take.
		ch := waitChans.Get().(chan struct{})
		s.ch, s.waiting = ch, true
		c.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-done:
			err = errDone
		}
		c.mu.Lock()
		s.ch, s.waiting = nil, false
		select {
		case <-ch:
		default:
		}
		waitChans.Put(ch)
		if err != nil {
			c.mu.Unlock()
			return err
		}
	}
}

// errDone is wait's answer when its done channel closed.
var errDone = errors.New("rawtcp: wait abandoned")

// check returns the error an operation on side s meets before its first
// syscall: closed or deadline passed.
func (c *Conn) check(s *side) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return net.ErrClosed
	case s.expired:
		return os.ErrDeadlineExceeded
	}
	return nil
}

func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// Read reads from the socket, blocking until data, EOF, an error, the read
// deadline or Close. It returns io.EOF once the peer has shut down its side.
func (c *Conn) Read(b []byte) (int, error) {
	c.rl.Lock()
	defer c.rl.Unlock()
	if !c.incref() {
		return 0, c.opError("read", net.ErrClosed)
	}
	defer c.decref()
	for {
		n, err := c.readOnce(b)
		if err != ErrWouldBlock {
			return n, err
		}
		if err := c.wait(&c.r, nil); err != nil {
			return 0, c.opError("read", err)
		}
	}
}

// TryRead reads what the socket holds without waiting: it returns
// ErrWouldBlock (unwrapped) when there is nothing to read yet, io.EOF once
// the peer has shut down its side. With WaitRead it makes the
// goroutine-free read loop:
//
//	for {
//		n, err := c.TryRead(buf)
//		if err == rawtcp.ErrWouldBlock {
//			if c.WaitRead(resume) {
//				return // resume is called when there is more
//			}
//			continue
//		}
//		...
//	}
//
// The read deadline is honoured as by Read.
func (c *Conn) TryRead(b []byte) (int, error) {
	c.rl.Lock()
	defer c.rl.Unlock()
	if !c.incref() {
		return 0, c.opError("read", net.ErrClosed)
	}
	defer c.decref()
	return c.readOnce(b)
}

// readOnce reads once what the socket holds, holding a reference:
// ErrWouldBlock when it holds nothing yet.
func (c *Conn) readOnce(b []byte) (int, error) {
	if err := c.check(&c.r); err != nil {
		return 0, c.opError("read", err)
	}
	for {
		n, err := ioRead(c.fd, b)
		switch err {
		case nil:
			if n == 0 && len(b) > 0 {
				return 0, io.EOF
			}
			return n, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return 0, ErrWouldBlock
		}
		return 0, c.opError("read", os.NewSyscallError("read", err))
	}
}

// Write writes all of b unless an error, the write deadline or Close stops
// it, blocking while the send buffer is full.
func (c *Conn) Write(b []byte) (int, error) {
	c.wl.Lock()
	defer c.wl.Unlock()
	if !c.incref() {
		return 0, c.opError("write", net.ErrClosed)
	}
	defer c.decref()
	nn := 0
	for {
		if err := c.check(&c.w); err != nil {
			return nn, c.opError("write", err)
		}
		// write(2), as Go's sockets do (rawWrite).
		n, err := ioWrite(c.fd, b[nn:])
		if n > 0 {
			nn += n
		}
		switch err {
		case nil:
			if nn == len(b) {
				return nn, nil
			}
			continue
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			if err := c.wait(&c.w, nil); err != nil {
				return nn, c.opError("write", err)
			}
			continue
		}
		return nn, c.opError("write", os.NewSyscallError("write", err))
	}
}

// WaitRead arranges for fn to be called once the socket may be readable,
// without a goroutine waiting for it.
//
// If the read side may be ready now (a readiness event arrived since the
// last WaitRead or blocking wait consumed one, the read deadline passed, or
// the Conn is closed), WaitRead consumes that and returns false without
// keeping fn: the caller reads now. Otherwise it stores fn and returns true;
// fn is then called exactly once, when the socket becomes readable, the peer
// hangs up or an error is pending (from the poller goroutine), or when the
// Conn is closed (from the goroutine calling Close). fn must not block: it
// holds up every other Conn's events. Typically it starts a goroutine.
//
// The intended loop reads until EAGAIN (or Read would block), then calls
// WaitRead: false means read again, true means return and let fn resume.
// There is no lost wake-up: an event arriving between the EAGAIN and
// WaitRead leaves a token that makes WaitRead return false.
//
// At most one WaitRead may be pending per Conn; a second call while one is
// pending panics.
func (c *Conn) WaitRead(fn func()) bool {
	if fn == nil {
		panic("rawtcp: WaitRead with nil func")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.readFn != nil {
		panic("rawtcp: WaitRead while another WaitRead is pending")
	}
	if c.closed || c.r.expired || c.r.ready {
		c.r.ready = false
		return false
	}
	c.readFn = fn
	return true
}

// Close closes the connection. It wakes every waiter: blocked Reads and
// Writes return an error for which errors.Is(err, net.ErrClosed), and a
// pending WaitRead callback is called (by this goroutine). The socket leaves
// the poller at once; its fd is closed when no syscall on it is in flight.
// Close is idempotent: later calls, like every later operation, return an
// error for which errors.Is(err, net.ErrClosed), as Go's net.Conn does.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return c.opError("close", net.ErrClosed)
	}
	c.closed = true
	c.refs++ // keep the fd open until it left the poller
	fn := c.readFn
	c.readFn = nil
	c.r.closeSide()
	c.w.closeSide()
	c.mu.Unlock()
	thePoll.deregister(c)
	c.decref()
	if fn != nil {
		fn()
	}
	return nil
}

// CloseWrite shuts down the sending side (the peer reads EOF).
func (c *Conn) CloseWrite() error {
	if !c.incref() {
		return c.opError("close", net.ErrClosed)
	}
	defer c.decref()
	if err := rawShutdown(c.fd, unix.SHUT_WR); err != nil {
		return c.opError("close", os.NewSyscallError("shutdown", err))
	}
	return nil
}

// SetLinger sets SO_LINGER as (*net.TCPConn).SetLinger does: sec < 0 lets
// the kernel finish sending in the background after Close (the default),
// sec == 0 makes Close discard unsent data and reset the connection, sec > 0
// makes Close wait up to sec seconds for the data to be sent.
func (c *Conn) SetLinger(sec int) error {
	if !c.incref() {
		return c.opError("set", net.ErrClosed)
	}
	defer c.decref()
	l := unix.Linger{}
	if sec >= 0 {
		l.Onoff, l.Linger = 1, int32(sec)
	}
	if sec > 0 {
		c.setLingers()
	}
	if err := rawSetsockoptLinger(c.fd, &l); err != nil {
		return c.opError("set", os.NewSyscallError("setsockopt", err))
	}
	return nil
}

// LocalAddr returns the local address (*net.TCPAddr); for a connection
// accepted on a transparent socket, the original destination.
func (c *Conn) LocalAddr() net.Addr { return tcpAddr(c.laddr) }

// RemoteAddr returns the peer's address (*net.TCPAddr).
func (c *Conn) RemoteAddr() net.Addr { return tcpAddr(c.raddr) }

// LocalAddrPort and RemoteAddrPort return the addresses without allocating.
func (c *Conn) LocalAddrPort() netip.AddrPort  { return c.laddr }
func (c *Conn) RemoteAddrPort() netip.AddrPort { return c.raddr }

func tcpAddr(ap netip.AddrPort) net.Addr {
	if !ap.IsValid() {
		return nil
	}
	return net.TCPAddrFromAddrPort(ap)
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.setDeadline(&c.r, t); err != nil {
		return err
	}
	return c.setDeadline(&c.w, t)
}

// SetReadDeadline sets the time after which Read (and RawConn.Read) fail
// with an error for which errors.Is(err, os.ErrDeadlineExceeded); a zero t
// clears it. It also affects a Read blocked now.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.setDeadline(&c.r, t) }

// SetWriteDeadline is SetReadDeadline for Write.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.setDeadline(&c.w, t) }

func (c *Conn) setDeadline(s *side, t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return c.opError("set", net.ErrClosed)
	}
	s.seq++
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	s.expired = false
	if t.IsZero() {
		return nil
	}
	d := time.Until(t)
	if d <= 0 {
		s.expired = true
		s.wake()
		return nil
	}
	seq := s.seq
	s.timer = time.AfterFunc(d, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if s.seq != seq || c.closed {
			return
		}
		s.expired = true
		s.timer = nil
		s.wake()
	})
	return nil
}

// SyscallConn returns a raw connection with the semantics of Go's: Control
// runs f holding a reference on the fd; Read and Write call f until it
// returns true, waiting for readiness (and honouring deadlines) in between.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	return rawConn{c}, nil
}

type rawConn struct{ c *Conn }

func (rc rawConn) Control(f func(fd uintptr)) error {
	c := rc.c
	if !c.incref() {
		return c.opError("raw-control", net.ErrClosed)
	}
	defer c.decref()
	// f may set SO_LINGER itself.
	c.setLingers()
	f(uintptr(c.fd))
	return nil
}

// setLingers records that the socket's SO_LINGER may have a positive
// time (closeFD).
func (c *Conn) setLingers() {
	c.mu.Lock()
	c.lingers = true
	c.mu.Unlock()
}

func (rc rawConn) Read(f func(fd uintptr) bool) error {
	c := rc.c
	c.rl.Lock()
	defer c.rl.Unlock()
	return c.rawIO(&c.r, "raw-read", f)
}

func (rc rawConn) Write(f func(fd uintptr) bool) error {
	c := rc.c
	c.wl.Lock()
	defer c.wl.Unlock()
	return c.rawIO(&c.w, "raw-write", f)
}

func (c *Conn) rawIO(s *side, op string, f func(fd uintptr) bool) error {
	if !c.incref() {
		return c.opError(op, net.ErrClosed)
	}
	defer c.decref()
	for {
		if err := c.check(s); err != nil {
			return c.opError(op, err)
		}
		if f(uintptr(c.fd)) {
			return nil
		}
		if err := c.wait(s, nil); err != nil {
			return c.opError(op, err)
		}
	}
}

var _ net.Conn = (*Conn)(nil)
