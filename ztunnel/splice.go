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

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// halfConn is a byte stream that can half-close: net.TCPConn and
// hbone.Stream.
type halfConn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// splice copies a→b and b→a until both directions ended, then closes a
// and b. a is the flow's downstream end (the client's connection, or the
// HBONE stream at the destination), b its upstream end (the connection
// the ztunnel dialled, or the HBONE stream at the source).
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
// Between a stream and a socket, the calling goroutine copies the socket
// to the stream, and the stream pushes what it receives to the socket
// itself (hbone.Stream.PushTo): one goroutine per flow, which holds no
// buffer while the socket is idle. Between two sockets each direction
// has a goroutine.
//
// It returns the bytes copied each way and the abort's cause: nil after an
// orderly end, an *endError naming the end that broke, or ctx's error.
func splice(ctx context.Context, a, b halfConn, abN, baN *atomic.Int64) (ab, ba int64, err error) {
	sp := &splicer{ctx: ctx, a: a, b: b}
	stop := context.AfterFunc(ctx, sp.abortCtx)
	switch {
	case sp.push(a, b, false, abN, &sp.ab):
		sp.ba = sp.copy(a, b, true, baN)
	case sp.push(b, a, true, baN, &sp.ba):
		sp.ab = sp.copy(b, a, false, abN)
	default:
		sp.wg.Add(1)
		go func() {
			defer sp.wg.Done()
			sp.ab = sp.copy(b, a, false, abN)
		}()
		sp.ba = sp.copy(a, b, true, baN)
	}
	sp.wg.Wait()
	if !stop() {
		sp.once.Do(func() {}) // wait for the abort ctx started
	}
	if sp.cause == nil {
		closeOrderly(a)
		closeOrderly(b)
	}
	return sp.ab, sp.ba, sp.cause
}

// splicer is what the two directions of a splice share (one allocation).
type splicer struct {
	ctx    context.Context
	a, b   halfConn
	ab, ba int64 // bytes copied a→b, b→a
	wg     sync.WaitGroup
	once   sync.Once
	cause  error // set by the first abort
	sink   pushSink
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
	return written
}

// push makes src, if it is a stream and dst a socket, push what it
// receives to dst (half-closing dst at the stream's end, or aborting the
// splice) and reports whether it does; srcUp says whether src is the
// upstream end. *written has the bytes pushed once the splice's wait
// group is done.
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
	sp.wg.Add(1)
	// PushTo writes what the stream queued already to the socket: deep
	// calls (a write system call under the push) that would double the
	// stack of the flow's goroutine for the flow's life (shallow).
	shallow(func() { sp.pushTo(st, dst, srcUp, written) })
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
				sp.wg.Done()
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
			defer sp.wg.Done()
			sp.abort(cause)
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
		resetEnd(sp.a, err)
		resetEnd(sp.b, err)
	})
}

// abortCtx aborts because the flow's context ended. When that is because
// the HBONE stream under it ended (the server cancels a stream's context
// with why), the end is the tunnel's, as if a read of the stream had said
// so.
func (sp *splicer) abortCtx() {
	cause := context.Cause(sp.ctx)
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
