package ztunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"
	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"
)

// halfConn is a byte stream that can half-close: net.TCPConn and
// hbone.Stream.
type halfConn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// splice copies a→b and b→a until both directions ended, then closes a
// and b, as startSplice does, and returns what startSplice's done gets.
func splice(ctx context.Context, a, b halfConn, abN, baN *atomic.Int64) (ab, ba int64, err error) {
	ended := make(chan struct{})
	startSplice(ctx, a, b, abN, baN, func(x, y int64, e error) {
		ab, ba, err = x, y, e
		close(ended)
	})
	<-ended
	return ab, ba, err
}

// startSplice starts copying a→b and b→a and returns; once both
// directions ended and a and b are closed, done gets the bytes copied each
// way and the abort's cause: nil after an orderly end, an *endError naming
// the end that broke, or ctx's error. a is the flow's downstream end (the
// client's connection, or the HBONE stream at the destination), b its
// upstream end (the connection the ztunnel dialled, or the HBONE stream at
// the source).
//
// The EOF of one end half-closes the other (CloseWrite: FIN or
// END_STREAM); when both directions ended so, a and b are closed in order
// (closeOrderly). Anything else aborts the splice at once and resets both
// ends, so that neither application takes the break for an end of data:
// an error reading or writing either end, or ctx's end. A TCP end is
// closed with RST; a stream end is reset with CONNECT_ERROR when the
// destination's connection broke (RFC 9113, section 8.5), CANCEL
// otherwise.
//
// No goroutine waits for an idle flow whose sockets are outside Go's
// poller (rawtcp): a stream pushes what it receives to the socket itself
// (hbone.Stream.PushTo), and a socket's reads start on a goroutine when
// the poller finds it readable, which ends once the socket has nothing
// more to read (asyncRead). Other readers are copied by a goroutine each
// (copy). done runs on whichever goroutine ended the flow.
func startSplice(ctx context.Context, a, b halfConn, abN, baN *atomic.Int64, done func(ab, ba int64, err error)) {
	sp := &splicer{ctx: ctx, a: a, b: b, done: done}
	sp.left.Store(2)
	if fc, ok := ctx.(*flowctx.Ctx); ok {
		// A flow's context (track): the abort is linked into it, with
		// no allocation, and runs on a goroutine of its own as
		// context.AfterFunc's would, since what ends the context may
		// hold locks that the abort takes (an HBONE connection's).
		fc.Register(&sp.hook, func() { go sp.abortCtx() })
	} else {
		sp.stop = context.AfterFunc(ctx, sp.abortCtx)
	}
	sp.start(b, a, false, abN, &sp.ab)
	sp.start(a, b, true, baN, &sp.ba)
}

// splicer is what the two directions of a splice share (one allocation).
type splicer struct {
	ctx     context.Context
	a, b    halfConn
	ab, ba  int64 // bytes copied a→b, b→a
	left    atomic.Int32
	hook    flowctx.Hook // the abort at ctx's end, when ctx is a flowctx.Ctx
	stop    func() bool  // stops the abort at ctx's end otherwise
	once    sync.Once
	cause   error // set by the first abort
	sink    pushSink
	done    func(ab, ba int64, err error)
	rmu     sync.Mutex
	readers []*asyncRead // the directions read by asyncRead
	aborted bool         // abort closed the readers' busy descriptors
}

// start starts the direction src→dst; srcUp says whether src is the
// upstream end. *written has the bytes copied once the direction told
// the splice it ended (dirDone).
func (sp *splicer) start(dst, src halfConn, srcUp bool, n *atomic.Int64, written *int64) {
	if sp.push(src, dst, srcUp, n, written) {
		return
	}
	if rw, ok := src.(readWaiter); ok {
		if rc, err := rw.SyscallConn(); err == nil {
			ar := &asyncRead{sp: sp, dst: dst, src: rw, rc: rc, srcUp: srcUp, n: n, written: written}
			sp.rmu.Lock()
			sp.readers = append(sp.readers, ar)
			sp.rmu.Unlock()
			ar.resume = func() { tasks.submit(ar) }
			tasks.submit(ar)
			return
		}
	}
	go func() {
		*written = sp.copy(dst, src, srcUp, n)
		sp.dirDone(false)
	}()
}

// dirDone counts a direction that ended; the last one ends the splice:
// both ends are closed in order unless the splice was aborted, and done is
// called. onLoop says that the caller must not wait (an HBONE connection's
// read loop): the end then runs on a goroutine of its own.
func (sp *splicer) dirDone(onLoop bool) {
	if sp.left.Add(-1) != 0 {
		return
	}
	if onLoop {
		tasks.submit(sp)
		return
	}
	sp.finish()
}

// run ends the splice as a task of the runner (dirDone).
func (sp *splicer) run() bool {
	sp.finish()
	return true
}

func (sp *splicer) finish() {
	if !sp.stopAbortCtx() {
		sp.once.Do(func() {}) // wait for the abort ctx started
	}
	if sp.cause == nil {
		closeOrderly(sp.a)
		closeOrderly(sp.b)
	}
	sp.done(sp.ab, sp.ba, sp.cause)
}

// copy copies src to dst (half-closing dst at src's EOF) and aborts the
// splice if that fails; srcUp says whether src is the upstream end.
func (sp *splicer) copy(dst, src halfConn, srcUp bool, n *atomic.Int64) int64 {
	// copyCounted, then CloseWrite here: a frame less on the stack
	// of an idle flow's goroutine. A socket is copied from here
	// (copyReadable), without copyCounted's frame: the goroutine waits
	// in it for as long as the flow is open, and the frames under its
	// wait decide whether its stack stays at Go's smallest (2 KiB).
	var (
		written  int64
		srcBroke bool
		err      error
	)
	if sc, rc := socketOf(src); rc != nil {
		written, srcBroke, err = copyReadable(dst, sc, rc, n)
	} else {
		written, srcBroke, err = copyCounted(dst, src, n)
	}
	sp.endCopy(dst, src, srcUp, srcBroke, err)
	return written
}

// endCopy ends the direction src→dst after its copy returned err: at
// src's EOF (err nil) dst is half-closed, and a failure aborts the splice,
// naming the end that broke.
func (sp *splicer) endCopy(dst, src halfConn, srcUp, srcBroke bool, err error) {
	if err == nil {
		err = dst.CloseWrite()
	}
	if err != nil {
		if srcBroke {
			sp.abort(endBroke(src, srcUp, err))
		} else {
			sp.abort(endBroke(dst, !srcUp, err))
		}
	}
}

// readWaiter is a socket outside Go's poller that can call a function
// when it becomes readable instead of a goroutine waiting for it:
// *rawtcp.Conn.
type readWaiter interface {
	syscallConn
	CloseWrite() error
	// WaitRead returns false if the socket may be readable now, and
	// otherwise keeps fn and calls it once it is (or closed).
	WaitRead(fn func()) bool
}

// asyncRead copies a readWaiter to dst for a splice without a goroutine
// that waits: it runs as a task of the runner, reads until the socket
// would block, then asks to be resumed (submitted again) when the socket
// is readable, and returns. A read takes a pooled buffer only when it
// finds data. Before it writes what it read, which may wait for the peer,
// it leaves the runner, and its goroutine ends once the socket has
// nothing more to read.
//
// A busy flow (stickyAfter chunks written) keeps its goroutine instead:
// it waits for the socket on the poller (waitReadable) as long as data
// moves at least every stickyIdle, which saves a task's start on every
// chunk of a bulk transfer or round trip of a request loop.
type asyncRead struct {
	sp      *splicer
	dst     halfConn
	src     readWaiter
	rc      syscall.RawConn
	srcUp   bool
	n       *atomic.Int64
	written *int64
	resume  func()
	chunks  int  // written to dst so far
	mark    int  // chunks when the idle deadline was set
	armed   bool // an idle deadline is set on busy

	bmu    sync.Mutex
	busy   *os.File        // while busy: a second descriptor of src, in Go's poller
	busyRC syscall.RawConn // busy's
}

const (
	// stickyAfter is how many chunks a flow writes before it keeps its
	// goroutine while busy.
	stickyAfter = 64
	// stickyIdle is how long a busy flow keeps its goroutine without
	// data before it waits without one again.
	stickyIdle = 2 * time.Second
)

func (ar *asyncRead) run() (worker bool) {
	var r socketRead
	worker = true
	for {
		var (
			readable bool
			err      error
		)
		if ar.chunks >= stickyAfter && !worker && ar.openBusy() {
			readable, err = ar.waitReadable(&r)
		} else {
			err = ar.rc.Control(func(fd uintptr) { readable = r.read(fd) })
		}
		if err == nil && !readable {
			if ar.src.WaitRead(ar.resume) {
				return worker // resumed as a task again
			}
			continue
		}
		if err == nil && r.errno != nil {
			err = readError(ar.src, r.errno)
		}
		if err != nil || r.nr == 0 {
			// The end: dst is half-closed or both ends reset, neither of
			// which waits.
			r.done()
			ar.closeBusy()
			ar.sp.endCopy(ar.dst, ar.src, ar.srcUp, err != nil, err)
			ar.sp.dirDone(false)
			return worker
		}
		if worker {
			tasks.leave()
			worker = false
		}
		nw, werr := writeCounted(ar.dst, (*r.buf)[:r.nr], ar.n)
		r.done()
		ar.chunks++
		*ar.written += int64(nw)
		if werr != nil {
			ar.closeBusy()
			ar.sp.endCopy(ar.dst, ar.src, ar.srcUp, false, werr)
			ar.sp.dirDone(false)
			return worker
		}
	}
}

// openBusy gives a busy flow a second descriptor of its socket in Go's
// poller, once: a busy flow's reads then wait there, which wakes the
// reader directly (rawtcp's poller is a goroutine of its own, one more
// hand-over per wake-up: 15 us more per echoed round trip of a pair of
// ztunnels). The records Go's poller keeps follow the flows busy at once,
// not every open flow. False if the flow cannot have one.
func (ar *asyncRead) openBusy() bool {
	ar.bmu.Lock()
	ok := ar.busy != nil
	ar.bmu.Unlock()
	if ok {
		return true
	}
	var (
		dup  int
		derr error
	)
	if err := ar.rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
		return false
	}
	// The descriptor shares the socket's O_NONBLOCK, so os.NewFile puts
	// it in Go's poller.
	f := os.NewFile(uintptr(dup), "flow")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return false
	}
	ar.bmu.Lock()
	if ar.sp.isAborted() { // closeBusy ran or runs after this lock
		ar.bmu.Unlock()
		f.Close()
		return false
	}
	ar.busy, ar.busyRC = f, rc
	ar.bmu.Unlock()
	if ri, ok := ar.src.(readInterest); ok {
		_ = ri.SetReadInterest(false)
	}
	return true
}

// readInterest is a socket whose poller can stop watching its read side
// (rawtcp.Conn.SetReadInterest): while a flow is busy, its reads wait in
// Go's poller only.
type readInterest interface {
	SetReadInterest(on bool) error
}

// closeBusy closes the busy descriptor, if any (a read waiting on it
// returns). After an abort, openBusy opens no other.
func (ar *asyncRead) closeBusy() {
	ar.bmu.Lock()
	defer ar.bmu.Unlock()
	if ar.busy != nil {
		ar.busy.Close()
		ar.busy, ar.busyRC = nil, nil
		if ri, ok := ar.src.(readInterest); ok {
			_ = ri.SetReadInterest(true) // fails only once src is closed
		}
	}
}

func (sp *splicer) isAborted() bool {
	sp.rmu.Lock()
	defer sp.rmu.Unlock()
	return sp.aborted
}

// waitReadable reads src through the busy descriptor, waiting in Go's
// poller until it has data: for a busy flow, as long as a chunk was
// written at least every stickyIdle. Then it closes the busy descriptor
// and returns false with no error: the flow waits without a goroutine
// again. An error is the read's, or the wait's (the splice aborted).
func (ar *asyncRead) waitReadable(r *socketRead) (readable bool, err error) {
	ar.bmu.Lock()
	busy, rc := ar.busy, ar.busyRC
	ar.bmu.Unlock()
	if busy == nil {
		return false, net.ErrClosed
	}
	read := func(fd uintptr) bool {
		readable = r.read(fd)
		return readable
	}
	for {
		if !ar.armed {
			if err := busy.SetReadDeadline(time.Now().Add(stickyIdle)); err != nil {
				ar.closeBusy()
				return false, err
			}
			ar.armed, ar.mark = true, ar.chunks
		}
		err := rc.Read(read)
		if err == nil {
			return readable, nil
		}
		ar.armed = false
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			ar.closeBusy()
			return false, err
		}
		if ar.chunks == ar.mark {
			ar.closeBusy()
			ar.chunks = 0 // idle: busy again only after stickyAfter more
			return false, nil
		}
	}
}

// push makes src, if it is a stream and dst a socket, push what it
// receives to dst (half-closing dst at the stream's end, or aborting the
// splice) and reports whether it does; srcUp says whether src is the
// upstream end. *written has the bytes pushed once the direction ended.
func (sp *splicer) push(src, dst halfConn, srcUp bool, n *atomic.Int64, written *int64) bool {
	st, ok := src.(*hbone.Stream)
	if !ok {
		return false
	}
	sc, ok := dst.(syscallConn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	sp.sink = pushSink{c: sc, rc: rc, n: n}
	sp.pushTo(st, dst, srcUp, written)
	return true
}

// pushTo starts src's push to the splice's socket sink (push).
func (sp *splicer) pushTo(st *hbone.Stream, dst halfConn, srcUp bool, written *int64) {
	src := halfConn(st)
	st.PushTo(&sp.sink, func(err error) {
		*written = sp.sink.written
		dstBroke := err != nil && err == sp.sink.err
		if err == nil {
			if err = dst.CloseWrite(); err == nil {
				sp.dirDone(true)
				return
			}
			dstBroke = true
		}
		cause := endBroke(src, srcUp, err)
		if dstBroke {
			cause = endBroke(dst, !srcUp, err)
		}
		// done must not wait, and may run inside an abort of this very
		// splice (which resets the stream): abort in a goroutine.
		go func() {
			sp.abort(cause)
			sp.dirDone(false)
		}()
	})
}

// pushSink is a socket as the sink of a stream's push: TryWrite writes
// what the socket takes without waiting, Write waits. Both count what
// they wrote.
type pushSink struct {
	c       net.Conn
	rc      syscall.RawConn
	n       *atomic.Int64
	written int64
	err     error // the socket's own failure
}

func (s *pushSink) TryWrite(p []byte) (int, error) {
	var (
		n     int
		errno error
	)
	err := s.rc.Write(func(fd uintptr) bool {
		for {
			n, errno = syscall.Write(int(fd), p)
			if errno != syscall.EINTR {
				return true
			}
		}
	})
	n = max(n, 0)
	if errno == syscall.EAGAIN {
		errno = nil
	}
	if err == nil && errno != nil {
		err = &net.OpError{Op: "write", Net: "tcp", Source: s.c.LocalAddr(), Addr: s.c.RemoteAddr(), Err: os.NewSyscallError("write", errno)}
	}
	return s.count(n, err)
}

func (s *pushSink) Write(p []byte) (int, error) {
	n, err := s.c.Write(p)
	return s.count(n, err)
}

func (s *pushSink) count(n int, err error) (int, error) {
	s.written += int64(n)
	s.n.Add(int64(n))
	if err != nil && s.err == nil {
		s.err = err
	}
	return n, err
}

// abort resets both ends, once; err is why.
func (sp *splicer) abort(err error) {
	sp.once.Do(func() {
		sp.cause = err
		// A busy reader's second descriptor of its socket goes first:
		// the socket's reset goes out when its last descriptor closes.
		sp.rmu.Lock()
		sp.aborted = true
		readers := sp.readers
		sp.rmu.Unlock()
		for _, ar := range readers {
			ar.closeBusy()
		}
		resetEnd(sp.a, err)
		resetEnd(sp.b, err)
	})
}

// stopAbortCtx stops the abort at ctx's end, and reports whether it did
// so before the abort started.
func (sp *splicer) stopAbortCtx() bool {
	if sp.stop != nil {
		return sp.stop()
	}
	return sp.ctx.(*flowctx.Ctx).Unregister(&sp.hook)
}

// abortCtx aborts because the flow's context ended. When that is because
// the HBONE stream under it ended (the server cancels a stream's context
// with why), the end is the tunnel's, as if a read of the stream had said
// so.
func (sp *splicer) abortCtx() {
	cause := flowctx.Cause(sp.ctx)
	if errors.Is(cause, hbone.ErrStreamClosed) {
		cause = tunnelBroke(cause, false)
	}
	sp.abort(cause)
}

// endBroke is the error of end c of a splice, upstream or not, failing
// with err. A stream is the tunnel, upstream at the source.
func endBroke(c halfConn, upstream bool, err error) error {
	switch {
	case isStream(c):
		return tunnelBroke(err, upstream)
	case upstream:
		return upstreamBroke(err)
	}
	return downstreamBroke(err)
}

func isStream(c halfConn) bool {
	_, ok := c.(*hbone.Stream)
	return ok
}

// resetEnd ends c abnormally, cause being why.
func resetEnd(c halfConn, cause error) {
	s, ok := c.(*hbone.Stream)
	if !ok {
		closeReset(c)
		return
	}
	var ee *endError
	if errors.As(cause, &ee) && ee.flag == FlagUpstreamReset {
		s.Reset(http2.ErrCodeConnect)
		return
	}
	s.Reset(http2.ErrCodeCancel)
}

// copyCounted copies src to dst until src's EOF, adding every chunk
// written to n so that readers of the open-flow registry see the bytes
// move. (Kernel splicing between two TCP sockets would be cheaper but
// gives no count until it returns.) On failure srcBroke says whether
// reading src or writing dst failed.
//
// While src has nothing to read, the copy holds no buffer: a stream
// writes its received chunks to dst itself (hbone.Stream.WriteTo), and a
// socket is read only once it is readable, into a pooled buffer taken
// then (copyReadable). Only other readers wait in Read with a pooled
// buffer.
func copyCounted(dst io.Writer, src io.Reader, n *atomic.Int64) (written int64, srcBroke bool, err error) {
	switch s := src.(type) {
	case *hbone.Stream:
		cw := &countingWriter{w: dst, n: n}
		written, err = s.WriteTo(cw)
		return written, err != nil && cw.err == nil, err
	}
	if sc, rc := socketOf(src); rc != nil {
		return copyReadable(dst, sc, rc, n)
	}
	return copyBuffered(dst, src, n)
}

// copyBuffered is copyCounted for readers that are neither streams nor
// sockets: it waits in Read with a pooled buffer.
func copyBuffered(dst io.Writer, src io.Reader, n *atomic.Int64) (written int64, srcBroke bool, err error) {
	buf := hbone.GetBuf()
	defer hbone.PutBuf(buf)
	b := *buf
	for {
		nr, rerr := src.Read(b)
		if nr > 0 {
			nw, werr := writeCounted(dst, b[:nr], n)
			written += int64(nw)
			if werr != nil {
				return written, false, werr
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return written, false, nil
			}
			return written, true, rerr
		}
	}
}

// syscallConn is a socket whose descriptor the copy may read itself:
// *net.TCPConn and types that embed one.
type syscallConn interface {
	net.Conn
	SyscallConn() (syscall.RawConn, error)
}

// socketOf returns src as a socket whose descriptor the copy may read
// itself, with its raw connection; a nil RawConn when it is none.
func socketOf(src io.Reader) (syscallConn, syscall.RawConn) {
	if sc, ok := src.(syscallConn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			return sc, rc
		}
	}
	return nil, nil
}

// copyReadable copies the socket c to dst as copyCounted does, reading
// c's descriptor only when the poller says it is readable: the pooled
// buffer is taken for a read that finds data, given back at once when
// the read would block, and after the write to dst. An idle flow thus
// holds no buffer while it waits for its peer. Its frame is small (the
// read's state is in a socketRead, the write in writeChunk): the flow's
// goroutine waits under it.
func copyReadable(dst io.Writer, c net.Conn, rc syscall.RawConn, n *atomic.Int64) (written int64, srcBroke bool, err error) {
	r := new(socketRead)
	read := r.read
	for {
		err := rc.Read(read)
		if err == nil && r.errno != nil {
			err = readError(c, r.errno)
		}
		if err != nil {
			r.done()
			return written, true, err
		}
		if r.nr == 0 {
			r.done()
			return written, false, nil // EOF
		}
		nw, werr := r.write(dst, n)
		r.done()
		written += int64(nw)
		if werr != nil {
			return written, false, werr
		}
	}
}

// socketRead is the state of copyReadable's reads.
type socketRead struct {
	buf    *[]byte // taken for a read that found data (or failed)
	nr     int
	errno  error
	writes int // chunks written to dst so far
}

// read reads fd into a pooled buffer; false, holding no buffer, when the
// read would block.
func (r *socketRead) read(fd uintptr) bool {
	r.buf = hbone.GetBuf()
	for {
		r.nr, r.errno = syscall.Read(int(fd), *r.buf)
		if r.errno != syscall.EINTR {
			break
		}
	}
	if r.errno == syscall.EAGAIN {
		r.done()
		return false
	}
	return true
}

// done gives the buffer back and clears the read.
func (r *socketRead) done() {
	if r.buf != nil {
		hbone.PutBuf(r.buf)
	}
	*r = socketRead{writes: r.writes}
}

func readError(c net.Conn, errno error) error {
	return &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", errno)}
}

// write writes what the last read read to dst (writeChunk).
func (r *socketRead) write(dst io.Writer, n *atomic.Int64) (int, error) {
	r.writes++
	return writeChunk(dst, (*r.buf)[:r.nr], n, r.writes > directAfter)
}

// writeChunk writes p, read from a socket, to dst and adds what was
// written to n. A stream's Write may encrypt and write the TLS connection
// itself: deep calls that would double the stack the flow's goroutine
// keeps while the flow is idle, so they run on a goroutine of their own
// (shallow) unless direct. That goroutine costs every write a wake-up
// of another thread (the runtime starts one to run or steal it): a flow
// that made directAfter writes writes itself from then on, and keeps the
// larger stack.
func writeChunk(dst io.Writer, p []byte, n *atomic.Int64, direct bool) (nw int, err error) {
	if _, ok := dst.(*hbone.Stream); ok && !direct {
		shallow(func() { nw, err = writeCounted(dst, p, n) })
		return nw, err
	}
	return writeCounted(dst, p, n)
}

// directAfter is how many chunks a flow writes to a stream on goroutines
// of their own (writeChunk) before it writes them itself: a flow that
// opens, answers and then idles (most of what an agent holds) keeps the
// smallest stack; a busy one (an echo loop, a bulk transfer) saves a
// thread wake-up per chunk.
const directAfter = 64

// writeCounted writes p to dst and adds what was written to n.
func writeCounted(dst io.Writer, p []byte, n *atomic.Int64) (int, error) {
	nw, err := dst.Write(p)
	if nw < 0 || nw > len(p) {
		nw, err = 0, errors.New("ztunnel: invalid write count")
	}
	n.Add(int64(nw))
	if err == nil && nw != len(p) {
		err = io.ErrShortWrite
	}
	return nw, err
}

// countingWriter counts what it writes and remembers its first error, so
// that a copy through it tells a failed write from a failed read.
type countingWriter struct {
	w   io.Writer
	n   *atomic.Int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	nw, err := writeCounted(c.w, p, c.n)
	if err != nil && c.err == nil {
		c.err = err
	}
	return nw, err
}
