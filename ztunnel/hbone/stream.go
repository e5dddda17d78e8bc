package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"golang.org/x/net/http2"
)

// ErrStreamClosed is returned by a Stream's Read and Write once the stream
// was reset or its connection closed.
var ErrStreamClosed = errors.New("hbone: stream closed")

// ResetError is what a Stream's Read and Write return once the client
// reset the stream (RST_STREAM); it wraps ErrStreamClosed. A stream whose
// connection closed under it fails with ErrStreamClosed alone, and one the
// client ended in order reads io.EOF.
type ResetError struct {
	// Code is the RST_STREAM's error code. CONNECT_ERROR says the client's
	// TCP connection broke (RFC 9113, section 8.5).
	Code http2.ErrCode
}

func (e *ResetError) Error() string {
	return "hbone: stream closed: reset by peer (" + e.Code.String() + ")"
}

// Unwrap makes errors.Is(err, ErrStreamClosed) true.
func (e *ResetError) Unwrap() error { return ErrStreamClosed }

// Stream is one CONNECT stream on the server side: a bidirectional byte
// stream with half-close (CloseWrite sends END_STREAM; Read returns io.EOF
// when the client sent END_STREAM).
type Stream struct {
	// Conn is the connection the stream arrived on.
	Conn *Conn
	// Authority is the CONNECT target as sent (:authority).
	Authority string
	// Header holds the request's regular header fields (canonical keys).
	Header http.Header

	sc     *serverConn
	id     uint32
	cond   sync.Cond // on sc.mu: data, window, or state changed
	ctx    context.Context
	cancel context.CancelCauseFunc // its cause: why the stream ended (a *ResetError, ErrStreamClosed)

	// guarded by sc.mu
	q          recvQueue
	recvWindow int64
	unacked    int64
	sendWindow int64
	recvEOF    bool
	responded  bool
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
}

// maybeRemoveLocked forgets st once both directions are done or it failed.
// The handler's charge stays until it returns (handlerDone).
func (sc *serverConn) maybeRemoveLocked(st *Stream) {
	if st.removed || !(st.err != nil || st.recvEOF && st.sentEnd) {
		return
	}
	st.removed = true
	delete(sc.streams, st.id)
}

// ID returns the HTTP/2 stream ID.
func (st *Stream) ID() uint32 { return st.id }

// Respond sends the response status. 200 opens the tunnel; any other
// status ends the stream.
func (st *Stream) Respond(status int) error {
	sc := st.sc
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st.responded {
		return errors.New("hbone: response already sent")
	}
	if st.err != nil {
		return st.err
	}
	if sc.werr != nil {
		return fmt.Errorf("hbone: respond: %w", sc.werr)
	}
	st.responded, st.status = true, status
	end := status != http.StatusOK
	rst := end && !st.recvEOF
	if end {
		if rst {
			st.err = ErrStreamClosed
		}
		st.sentEnd = true
		sc.maybeRemoveLocked(st)
	}
	h := ctlFrame{kind: ctlHeaders, id: st.id, val: uint32(status), end: end}
	if !sc.directLocked() {
		sc.queueCtlLocked(h)
		if rst {
			sc.queueCtlLocked(ctlFrame{kind: ctlRST, id: st.id, code: http2.ErrCodeNo})
		}
		return nil
	}
	sc.prepareCtlLocked(&h)
	sc.mu.Unlock()
	err := sc.writeCtl(&h)
	if err == nil && rst {
		err = sc.fr.WriteRSTStream(st.id, http2.ErrCodeNo)
	}
	if err == nil {
		err = sc.flushDirect()
	}
	sc.mu.Lock()
	sc.endDirectLocked(err)
	if err != nil {
		return fmt.Errorf("hbone: respond: %w", err)
	}
	return nil
}

// Read reads what the client sent: io.EOF after the client half-closed
// (END_STREAM), the only orderly end; a *ResetError after it reset the
// stream; an error wrapping ErrStreamClosed when the stream or its
// connection ended otherwise.
func (st *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	sc := st.sc
	sc.mu.Lock()
	defer sc.mu.Unlock()
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
	sc.grantLocked(st, int64(n))
	sc.maybeRemoveLocked(st)
	return n, nil
}

// Write sends p to the client as DATA frames, within the flow-control
// windows; it returns once p is written to the connection (or the stream
// failed). It fails before a 200 response and after CloseWrite.
func (st *Stream) Write(p []byte) (int, error) {
	sc := st.sc
	sc.mu.Lock()
	defer sc.mu.Unlock()
	switch {
	case st.err != nil:
		return 0, st.err
	case sc.werr != nil:
		return 0, sc.werr
	case sc.closed:
		return 0, ErrStreamClosed
	case !st.responded || st.status != http.StatusOK:
		return 0, errors.New("hbone: write before a 200 response")
	case st.sentEnd:
		return 0, errors.New("hbone: write after CloseWrite")
	case len(p) == 0:
		return 0, nil
	}
	written := 0
	if n := min(len(p), int(min(st.sendWindow, sc.connSendWindow))); n > 0 && sc.directLocked() {
		st.sendWindow -= int64(n)
		sc.connSendWindow -= int64(n)
		maxFrame := sc.peerMaxFrame
		sc.mu.Unlock()
		var err error
		for q := p[:n]; len(q) > 0 && err == nil; {
			k := min(len(q), maxFrame)
			err = sc.writeData(st.id, q[:k], false)
			q = q[k:]
		}
		if err == nil {
			err = sc.flushDirect()
		}
		sc.mu.Lock()
		sc.endDirectLocked(err)
		if err != nil {
			return 0, sc.werr
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
	sc.readyLocked(st)
	for (len(st.wbuf) > 0 && st.err == nil && sc.werr == nil) || st.writing {
		st.cond.Wait()
	}
	n := len(p) - len(st.wbuf)
	st.wbuf = nil
	switch {
	case n == len(p):
		return written + n, nil
	case st.err != nil:
		return written + n, st.err
	case sc.werr != nil:
		return written + n, sc.werr
	}
	return written + n, ErrStreamClosed
}

// CloseWrite half-closes the stream (END_STREAM): the client reads EOF and
// may keep sending.
func (st *Stream) CloseWrite() error {
	sc := st.sc
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st.sentEnd || st.err != nil {
		return nil
	}
	if !st.responded {
		return errors.New("hbone: CloseWrite before Respond")
	}
	st.sentEnd = true
	sc.maybeRemoveLocked(st)
	if !sc.directLocked() {
		st.wantEnd = true
		sc.readyLocked(st)
		return nil
	}
	sc.mu.Unlock()
	err := sc.writeData(st.id, nil, true)
	if err == nil {
		err = sc.flushDirect()
	}
	sc.mu.Lock()
	sc.endDirectLocked(err)
	return err
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
// is dropped and its connection window given back; the handler's context
// ends.
func (st *Stream) abort(code http2.ErrCode, err error) {
	sc := st.sc
	sc.mu.Lock()
	if st.removed {
		sc.mu.Unlock()
		return
	}
	if st.err == nil {
		st.err = err
	}
	sc.creditConnLocked(int64(st.q.reset()))
	st.cond.Broadcast()
	sc.maybeRemoveLocked(st)
	if code != 0 && !sc.closed {
		sc.queueCtlLocked(ctlFrame{kind: ctlRST, id: st.id, code: code})
	}
	sc.mu.Unlock()
	st.cancel(err)
}
