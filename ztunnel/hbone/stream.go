package hbone

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"sync"

	"github.com/mantlet/mantlet/internal/shrink"
	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"

	"golang.org/x/net/http2"
)

// ErrStreamClosed is returned by a Stream's Read and Write once the stream
// was reset or its connection closed.
var ErrStreamClosed = errors.New("hbone: stream closed")

// ResetError is what a Stream's Read and Write return once the peer
// reset the stream (RST_STREAM); it wraps ErrStreamClosed. A stream whose
// connection closed under it fails with ErrStreamClosed alone, and one the
// peer ended in order reads io.EOF.
type ResetError struct {
	// Code is the RST_STREAM's error code. CONNECT_ERROR says the peer's
	// TCP connection broke (RFC 9113, section 8.5).
	Code http2.ErrCode
}

func (e *ResetError) Error() string {
	return "hbone: stream closed: reset by peer (" + e.Code.String() + ")"
}

// Unwrap makes errors.Is(err, ErrStreamClosed) true.
func (e *ResetError) Unwrap() error { return ErrStreamClosed }

// Stream is one CONNECT stream, on the server side (Server.Handler) or the
// client side (Pool.Connect): a bidirectional byte stream with
// half-close (CloseWrite sends END_STREAM; Read returns io.EOF when the
// peer sent END_STREAM). An idle stream holds no buffer: received bytes
// wait in pooled chunks until they are read, and Write sends from the
// caller's buffer.
type Stream struct {
	// Conn is the connection the stream is on.
	Conn *Conn
	// Authority is the CONNECT target (:authority).
	Authority string
	// Header holds the request's regular header fields (canonical keys);
	// on the client side, the extra fields sent besides Forwarded.
	Header http.Header

	hc   *h2conn
	id   uint32
	cond sync.Cond // on hc.mu: data, window, or state changed
	// ctx is a server stream's context, nil on the client side. It ends
	// with the stream, and its cause says why (a *ResetError,
	// ErrStreamClosed); it is Owned by the stream, which the connection's
	// teardown ends, so that it costs no registration with the
	// connection's context.
	ctx *flowctx.Ctx
	fwd netip.AddrPort // client: the Forwarded header to send

	// guarded by hc.mu
	q          recvQueue
	recvWindow int64
	unacked    int64
	sendWindow int64
	recvEOF    bool
	responded  bool // server: status sent; client: status received
	status     int
	sentEnd    bool   // CloseWrite called, or a final status sent
	wantEnd    bool   // END_STREAM still to be written after wbuf
	wbuf       []byte // a Write's data not yet framed
	writing    bool   // the writer is sending from wbuf
	inReady    bool
	wu         int64 // stream WINDOW_UPDATE to send
	wuQueued   bool
	err        error // reset or connection closed
	removed    bool
	push       Sink        // PushTo's
	pushDone   func(error) // PushTo's
	pushBusy   bool        // a pushOut writes
	pushEnded  bool        // done was called or is being called
	pushFail   error       // the sink's error
	detached   bool        // server: the handler's return does not end the stream (Detach)
}

// streamsShrinkFrom is the peak from which a connection's stream map is
// made anew once it holds a quarter of that: a server connection may
// carry 1,000 streams (Tuning.MaxConcurrentStreams), ~40 KB of map that
// would otherwise stay as long as the connection.
const streamsShrinkFrom = 256

// maybeRemoveLocked forgets st once both directions are done or it failed.
// On the server the handler's charge stays until it returns
// (handlerDone); on the client its place on the connection is free.
func (hc *h2conn) maybeRemoveLocked(st *Stream) {
	if st.removed || !(st.err != nil || st.recvEOF && st.sentEnd) {
		return
	}
	st.removed = true
	shrink.Delete(&hc.streams, st.id, &hc.streamsPeak)
	if hc.srv == nil {
		hc.streamEndedLocked()
	}
}

// ID returns the HTTP/2 stream ID.
func (st *Stream) ID() uint32 { return st.id }

// Respond sends the response status of a server stream. 200 opens the
// tunnel; any other status ends the stream.
func (st *Stream) Respond(status int) error {
	hc := st.hc
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.srv == nil {
		return errors.New("hbone: Respond on a client stream")
	}
	if st.responded {
		return errors.New("hbone: response already sent")
	}
	if st.err != nil {
		return st.err
	}
	if hc.werr != nil {
		return fmt.Errorf("hbone: respond: %w", hc.werr)
	}
	st.responded, st.status = true, status
	end := status != http.StatusOK
	rst := end && !st.recvEOF
	if end {
		if rst {
			st.err = ErrStreamClosed
		}
		st.sentEnd = true
		hc.maybeRemoveLocked(st)
	}
	h := ctlFrame{kind: ctlHeaders, id: st.id, val: uint32(status), end: end}
	if !hc.directLocked() {
		hc.queueCtlLocked(h)
		if rst {
			hc.queueCtlLocked(ctlFrame{kind: ctlRST, id: st.id, code: http2.ErrCodeNo})
		}
		return nil
	}
	hc.prepareCtlLocked(&h)
	hc.mu.Unlock()
	err := hc.writeCtl(&h)
	if err == nil && rst {
		err = hc.wfr.WriteRSTStream(st.id, http2.ErrCodeNo)
	}
	if err == nil {
		err = hc.flushDirect()
	}
	hc.mu.Lock()
	hc.endDirectLocked(err)
	if err != nil {
		return fmt.Errorf("hbone: respond: %w", err)
	}
	return nil
}

// Read reads what the peer sent: io.EOF after the peer half-closed
// (END_STREAM), the only orderly end; a *ResetError after it reset the
// stream; an error wrapping ErrStreamClosed when the stream or its
// connection ended otherwise.
func (st *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	hc := st.hc
	hc.mu.Lock()
	defer hc.mu.Unlock()
	for st.q.n == 0 && !st.recvEOF && st.err == nil {
		st.cond.Wait()
	}
	if st.q.n == 0 {
		if st.err != nil {
			return 0, st.err
		}
		return 0, io.EOF
	}
	n := st.q.read(p)
	st.unacked += int64(n)
	hc.grantLocked(st, int64(n))
	hc.maybeRemoveLocked(st)
	return n, nil
}

// WriteTo writes what the peer sends to w until the peer's END_STREAM
// (then it returns nil) or an error: Read's, or w's. It holds no buffer
// while it waits: each received chunk is written to w as it is and goes
// back to its pool, and the windows are given back once w took it.
func (st *Stream) WriteTo(w io.Writer) (int64, error) {
	hc := st.hc
	var total int64
	hc.mu.Lock()
	for {
		for st.q.n == 0 && !st.recvEOF && st.err == nil {
			st.cond.Wait()
		}
		if st.q.n == 0 {
			err := st.err
			hc.mu.Unlock()
			return total, err
		}
		c, p := st.q.take()
		hc.mu.Unlock()
		n, err := w.Write(p)
		putChunk(c)
		total += int64(n)
		hc.mu.Lock()
		st.unacked += int64(len(p))
		hc.grantLocked(st, int64(len(p)))
		hc.maybeRemoveLocked(st)
		if err != nil {
			hc.mu.Unlock()
			return total, err
		}
	}
}

// Write sends p to the peer as DATA frames, within the flow-control
// windows; it returns once p is written to the connection (or the stream
// failed). It fails before a 200 response and after CloseWrite.
func (st *Stream) Write(p []byte) (int, error) {
	hc := st.hc
	hc.mu.Lock()
	defer hc.mu.Unlock()
	switch {
	case st.err != nil:
		return 0, st.err
	case hc.werr != nil:
		return 0, hc.werr
	case hc.closed:
		return 0, ErrStreamClosed
	case !st.responded || st.status != http.StatusOK:
		return 0, errors.New("hbone: write before a 200 response")
	case st.sentEnd:
		return 0, errors.New("hbone: write after CloseWrite")
	case len(p) == 0:
		return 0, nil
	}
	written := 0
	if n := min(len(p), int(min(st.sendWindow, hc.connSendWindow))); n > 0 && hc.directLocked() {
		st.sendWindow -= int64(n)
		hc.connSendWindow -= int64(n)
		maxFrame := hc.peerMaxFrame
		hc.mu.Unlock()
		var err error
		for q := p[:n]; len(q) > 0 && err == nil; {
			k := min(len(q), maxFrame)
			err = hc.writeData(st.id, q[:k], false)
			q = q[k:]
		}
		if err == nil {
			err = hc.flushDirect()
		}
		hc.mu.Lock()
		hc.endDirectLocked(err)
		if err != nil {
			return 0, hc.werr
		}
		if n == len(p) {
			return n, nil
		}
		written, p = n, p[n:]
		if st.err != nil {
			return written, st.err
		}
	}
	st.wbuf = p
	hc.readyLocked(st)
	for (len(st.wbuf) > 0 && st.err == nil && hc.werr == nil) || st.writing {
		st.cond.Wait()
	}
	n := len(p) - len(st.wbuf)
	st.wbuf = nil
	switch {
	case n == len(p):
		return written + n, nil
	case st.err != nil:
		return written + n, st.err
	case hc.werr != nil:
		return written + n, hc.werr
	}
	return written + n, ErrStreamClosed
}

// CloseWrite half-closes the stream (END_STREAM): the peer reads EOF and
// may keep sending.
func (st *Stream) CloseWrite() error {
	hc := st.hc
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if st.sentEnd || st.err != nil {
		return nil
	}
	if !st.responded {
		return errors.New("hbone: CloseWrite before Respond")
	}
	st.sentEnd = true
	hc.maybeRemoveLocked(st)
	// The connection's writer sends END_STREAM: CloseWrite never waits
	// for the connection's socket, so that the goroutines that end
	// flows (a bounded set, ztunnel's runner) cannot be held by a peer
	// that stopped reading.
	st.wantEnd = true
	hc.readyLocked(st)
	return nil
}

// Close ends the stream; if either direction is still open, the stream is
// reset (CANCEL).
func (st *Stream) Close() error {
	st.abort(http2.ErrCodeCancel, ErrStreamClosed)
	return nil
}

// Reset ends the stream abnormally in both directions: RST_STREAM with
// code (CANCEL for NO_ERROR), and what was received but not read is
// dropped. It is the end to use instead of CloseWrite when what the stream
// carries broke: CONNECT_ERROR when the TCP connection it is spliced to
// failed (RFC 9113, section 8.5). It does nothing once the stream ended
// (both directions done, reset, or its connection closed).
func (st *Stream) Reset(code http2.ErrCode) {
	if code == http2.ErrCodeNo {
		code = http2.ErrCodeCancel
	}
	st.abort(code, ErrStreamClosed)
}

// abort resets the stream: code != 0 sends RST_STREAM with it; queued data
// is dropped and its connection window given back; a handler's context
// ends.
func (st *Stream) abort(code http2.ErrCode, err error) {
	hc := st.hc
	hc.mu.Lock()
	if st.removed {
		// Ended already; what the peer sent before its reset may still be
		// queued.
		hc.creditConnLocked(int64(st.q.reset()))
		step := st.pushStepLocked()
		hc.mu.Unlock()
		st.pushRun(step, false)
		return
	}
	if st.err == nil {
		st.err = err
	}
	hc.creditConnLocked(int64(st.q.reset()))
	st.cond.Broadcast()
	hc.maybeRemoveLocked(st)
	if code != 0 && !hc.closed {
		hc.queueCtlLocked(ctlFrame{kind: ctlRST, id: st.id, code: code})
	}
	step := st.pushStepLocked()
	hc.mu.Unlock()
	st.pushRun(step, false)
	if st.ctx != nil {
		st.ctx.Cancel(err)
	}
}
