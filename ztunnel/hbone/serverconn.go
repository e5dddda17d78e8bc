package hbone

import (
	"fmt"
	"net/http"
	"time"

	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"
	"golang.org/x/net/http2"
)

// The server's side of a connection: CONNECT requests, their handlers and
// the charges that bound what one client may cost (streams, resets,
// refusals), idle close and end of life.

// serverStreamError handles a stream error of the framer (a malformed
// header block, say); false ends the connection.
func (hc *h2conn) serverStreamError(se http2.StreamError) bool {
	hc.mu.Lock()
	st := hc.streams[se.StreamID]
	isNew := st == nil && se.StreamID > hc.lastStreamID && se.StreamID%2 == 1
	if isNew {
		hc.lastStreamID = se.StreamID
	}
	hc.mu.Unlock()
	if isNew {
		return hc.refuse(se.StreamID, false, http.StatusBadRequest, fmt.Errorf("hbone: %w: %v", ErrMalformed, se.Cause))
	}
	if st != nil {
		st.abort(se.Code, ErrStreamClosed)
		return true
	}
	return hc.queuePeer(ctlFrame{kind: ctlRST, id: se.StreamID, code: se.Code})
}

// processRequest handles a client's HEADERS: a new CONNECT, or trailers
// that end a stream's data.
func (hc *h2conn) processRequest(f *http2.MetaHeadersFrame) bool {
	id := f.StreamID
	hc.mu.Lock()
	if st := hc.streams[id]; st != nil {
		// Trailers: accepted only as the end of the client's data.
		hc.mu.Unlock()
		if !f.StreamEnded() {
			st.abort(http2.ErrCodeProtocol, ErrStreamClosed)
			return true
		}
		hc.mu.Lock()
		st.recvEOF = true
		st.cond.Broadcast()
		hc.maybeRemoveLocked(st)
		step := st.pushStepLocked()
		hc.mu.Unlock()
		st.pushRun(step, false)
		return true
	}
	if id%2 == 0 || id <= hc.lastStreamID {
		hc.mu.Unlock()
		return hc.connError(http2.ErrCodeProtocol)
	}
	hc.lastStreamID = id
	if hc.goingAway || hc.closed {
		hc.mu.Unlock()
		return hc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeRefusedStream})
	}
	if hc.running >= int(hc.t.MaxConcurrentStreams) {
		hc.mu.Unlock()
		if !hc.noWork("streams beyond the concurrency limit") ||
			!hc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeRefusedStream}) {
			return false
		}
		if hc.srv.Refused != nil {
			hc.srv.Refused(hc.info, fmt.Errorf("hbone: %w (%d)", ErrStreamLimit, hc.t.MaxConcurrentStreams))
		}
		return true
	}
	hc.mu.Unlock()

	switch method := f.PseudoValue("method"); {
	case f.Truncated:
		return hc.refuse(id, f.StreamEnded(), http.StatusRequestHeaderFieldsTooLarge,
			fmt.Errorf("hbone: %w (limit %d bytes)", ErrHeadersTooLarge, hc.t.MaxHeaderListSize))
	case method != http.MethodConnect:
		return hc.refuse(id, f.StreamEnded(), http.StatusBadRequest, fmt.Errorf("hbone: %w: %q", ErrNotConnect, method))
	case f.PseudoValue("authority") == "" || f.PseudoValue("path") != "" ||
		f.PseudoValue("scheme") != "" || f.PseudoValue("protocol") != "":
		return hc.refuse(id, f.StreamEnded(), http.StatusBadRequest,
			fmt.Errorf("hbone: %w: CONNECT needs :authority and no :path, :scheme or :protocol", ErrMalformed))
	}
	st := &Stream{
		Conn:      hc.info,
		Authority: f.PseudoValue("authority"),
		hc:        hc,
		id:        id,
	}
	if fields := f.RegularFields(); len(fields) > 0 {
		st.Header = make(http.Header, len(fields))
		for _, hf := range fields {
			k := http.CanonicalHeaderKey(hf.Name)
			st.Header[k] = append(st.Header[k], hf.Value)
		}
	}
	st.cond.L = &hc.mu
	st.ctx = flowctx.Owned(hc.ctx) // ended by the stream's end, or by teardown
	hc.mu.Lock()
	st.recvWindow = int64(hc.t.StreamWindow)
	st.sendWindow = hc.peerInitWindow
	st.recvEOF = f.StreamEnded()
	hc.streams[id] = st
	hc.running++
	hc.idle.Stop()
	hc.wg.Add(1)
	hc.mu.Unlock()
	go hc.runHandler(st)
	return true
}

// processClientReset handles a client's RST_STREAM. Resets of streams not
// answered yet are charged to the rapid-reset budget; false ends the
// connection.
func (hc *h2conn) processClientReset(f *http2.RSTStreamFrame) bool {
	hc.mu.Lock()
	st := hc.streams[f.StreamID]
	premature := st != nil && !st.responded
	hc.mu.Unlock()
	if st == nil {
		return true
	}
	st.abort(0, &ResetError{Code: f.ErrCode})
	if premature && !hc.resets.take(time.Now(), hc.t.ResetRate, hc.t.ResetBurst) {
		return hc.calm(ErrRapidReset, fmt.Sprintf("more than %d streams reset before their answer, at %g/s", hc.t.ResetBurst, hc.t.ResetRate))
	}
	return true
}

// runHandler runs the server's handler of st, then ends the stream unless
// the handler detached it (Stream.Detach).
func (hc *h2conn) runHandler(st *Stream) {
	if hc.srv.Handler == nil {
		_ = st.Respond(http.StatusServiceUnavailable)
	} else {
		hc.srv.Handler(st.ctx, st)
	}
	hc.mu.Lock()
	detached := st.detached
	hc.mu.Unlock()
	if !detached {
		hc.handlerDone(st)
	}
}

// Detach lets a server stream outlive its handler's goroutine, so that a
// stream whose user waits for nothing (its data pushed to a socket, the
// socket's read readiness watched by a poller) needs no goroutine while it
// is idle. Once the handler called Detach, its return neither answers nor
// closes the stream nor releases the stream's charge against
// Tuning.MaxConcurrentStreams: done does all that, as the handler's return
// would have, and must be called exactly once when the stream's user is
// finished with it. The stream still counts, and ServeConn still waits for
// done, whatever the client does. Detach must be called by the handler,
// before it returns; on a client stream it returns a done that does
// nothing.
func (st *Stream) Detach() (done func()) {
	hc := st.hc
	if hc.srv == nil {
		return func() {}
	}
	hc.mu.Lock()
	st.detached = true
	hc.mu.Unlock()
	return func() { hc.handlerDone(st) }
}

// handlerDone answers a stream its handler left unanswered, closes it and
// releases its charge once its handler returned (or, detached, once the
// stream's done was called).
func (hc *h2conn) handlerDone(st *Stream) {
	defer hc.wg.Done()
	hc.mu.Lock()
	responded := st.responded
	hc.mu.Unlock()
	if !responded {
		_ = st.Respond(http.StatusInternalServerError)
	}
	st.Close()
	st.ctx.Cancel(nil)
	hc.mu.Lock()
	hc.running--
	if hc.running == 0 {
		if hc.goingAway {
			hc.closeWhenFlushedLocked()
		} else if !hc.closed {
			hc.idle.Reset(hc.t.IdleTimeout)
		}
	}
	hc.mu.Unlock()
}

// refuse answers a stream the server will not register: status with
// END_STREAM, then RST_STREAM(NO_ERROR) if the client is still sending.
// false ends the connection (a flood of refused requests).
func (hc *h2conn) refuse(id uint32, clientDone bool, status int, err error) bool {
	if !hc.noWork("refused requests") || !hc.queuePeer(ctlFrame{kind: ctlHeaders, id: id, val: uint32(status), end: true}) {
		return false
	}
	if !clientDone && !hc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeNo}) {
		return false
	}
	hc.log.Debug("hbone: refused request", "remote", hc.info.Remote, "status", status, "reason", err)
	if hc.srv.Refused != nil {
		hc.srv.Refused(hc.info, err)
	}
	return true
}

func (hc *h2conn) onIdle() {
	hc.mu.Lock()
	idle := hc.running == 0 && !hc.closed
	hc.mu.Unlock()
	if idle {
		hc.log.Debug("hbone: closing idle connection", "remote", hc.info.Remote)
		hc.goAway(http2.ErrCodeNo)
	}
}

// onExpired ends the connection's life (Conn.Expires): no new stream, and
// the open ones get Tuning.DrainTimeout before the connection is closed.
func (hc *h2conn) onExpired() {
	hc.log.Debug("hbone: connection reached its end of life", "remote", hc.info.Remote, "peer", hc.info.PeerID,
		"expires", hc.info.Expires)
	hc.goAway(http2.ErrCodeNo)
}
