package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"
	"golang.org/x/net/http2"
)

// The client's side of a connection: CONNECT requests out, their answers
// in, the peer's GOAWAY and limits, and a keepalive.

// clientState is what only a client connection keeps (guarded by
// h2conn.mu).
type clientState struct {
	nextID         uint32 // the next stream's ID
	peerMaxStreams uint32 // the server's SETTINGS_MAX_CONCURRENT_STREAMS
	active         int    // streams reserved or open
	idleAt         time.Time
	retireAt       time.Time // no new stream from then on (see retireTime)
	goAwayRecv     bool      // the server sent GOAWAY: no new stream
	pingOut        bool      // a keepalive PING waits for its answer
	seenFrames     uint64
	keepalive      *time.Timer
}

// errRetry marks an error of a CONNECT that the server never processed
// (refused stream, GOAWAY, a connection that cannot take streams): it may
// go on another connection.
var errRetry = errors.New("hbone: stream not processed by the server")

// startClient runs HTTP/2 as the client on tc, whose handshake is done:
// the preface and our SETTINGS go out, the read loop and the writer start.
// The connection stops taking streams at retireAt.
func startClient(tc *tls.Conn, t Tuning, log *slog.Logger, retireAt time.Time) (*h2conn, error) {
	cs := tc.ConnectionState()
	info := &Conn{TLS: cs}
	info.Local, _ = addrOf(tc.LocalAddr())
	info.Remote, _ = addrOf(tc.RemoteAddr())
	info.PeerID, _ = PeerID(cs)
	hc := newConn(t, log, tc, info)
	hc.cl = clientState{nextID: 1, peerMaxStreams: 1<<31 - 1, idleAt: time.Now(), retireAt: retireAt}
	_ = tc.SetWriteDeadline(time.Now().Add(t.HandshakeTimeout))
	if _, err := tc.Write([]byte(http2.ClientPreface)); err != nil {
		return nil, fmt.Errorf("hbone: write the HTTP/2 preface: %w", err)
	}
	_ = tc.SetWriteDeadline(time.Time{})
	hc.mu.Lock()
	hc.queueCtlLocked(ctlFrame{kind: ctlSettings})
	hc.cl.keepalive = time.AfterFunc(t.KeepaliveInterval, hc.keepalive)
	hc.mu.Unlock()
	go hc.writeLoop()
	go hc.readLoop()
	return hc, nil
}

// reserve takes a place for a new stream on the connection, if it has
// one: fewer than limit streams (and the server's own limit), and neither
// ending nor retired at now.
func (hc *h2conn) reserve(limit int, now time.Time) bool {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if !hc.usableLocked(now) || hc.cl.active >= min(limit, int(hc.cl.peerMaxStreams)) {
		return false
	}
	hc.cl.active++
	return true
}

// load returns how many streams the connection carries, and whether it
// may take another one (see reserve).
func (hc *h2conn) load(limit int, now time.Time) (active int, room bool) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return hc.cl.active, hc.usableLocked(now) && hc.cl.active < min(limit, int(hc.cl.peerMaxStreams))
}

// usableLocked reports whether the connection may take new streams.
func (hc *h2conn) usableLocked(now time.Time) bool {
	return !hc.closed && !hc.goingAway && !hc.cl.goAwayRecv && hc.werr == nil &&
		hc.cl.nextID < 1<<31-1 && now.Before(hc.cl.retireAt)
}

// streamEndedLocked frees a stream's place. A retired connection closes
// once its last stream ended.
func (hc *h2conn) streamEndedLocked() {
	hc.cl.active--
	if hc.cl.active > 0 {
		return
	}
	hc.cl.idleAt = time.Now()
	if !hc.cl.idleAt.Before(hc.cl.retireAt) && !hc.closed {
		hc.log.Debug("hbone: closing a retired connection", "retired_at", hc.cl.retireAt)
		hc.goAwayLocked(http2.ErrCodeNo)
	}
}

// idleState reports how long the connection has had no stream (0 while it
// has some), whether it is dead, and whether it is retired at now.
func (hc *h2conn) idleState(now time.Time) (idle time.Duration, dead, retired bool) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.cl.active == 0 {
		idle = now.Sub(hc.cl.idleAt)
	}
	return idle, hc.closed || hc.werr != nil, !now.Before(hc.cl.retireAt)
}

// close closes the connection; its streams fail.
func (hc *h2conn) close() {
	hc.closeConn()
	<-hc.done
}

// open sends a CONNECT for req on a place that reserve took, and waits
// for the answer. A 200 returns the open stream; any other status a
// *RefusedError. Errors wrapping errRetry say that the server did not
// process the request.
func (hc *h2conn) open(ctx context.Context, req *Request) (*Stream, error) {
	st := &Stream{
		Conn:      hc.info,
		Authority: req.Target.String(),
		Header:    req.Header,
		hc:        hc,
		fwd:       req.Forwarded,
	}
	st.cond.L = &hc.mu
	hc.mu.Lock()
	if !hc.usableLocked(time.Now()) {
		hc.streamEndedLocked()
		hc.mu.Unlock()
		return nil, fmt.Errorf("%w: the connection takes no new streams", errRetry)
	}
	st.id = hc.cl.nextID
	hc.cl.nextID += 2
	st.recvWindow = int64(hc.t.StreamWindow)
	st.sendWindow = hc.peerInitWindow
	hc.streams[st.id] = st
	h := ctlFrame{kind: ctlRequest, id: st.id, st: st}
	if hc.directLocked() {
		hc.prepareCtlLocked(&h)
		hc.mu.Unlock()
		err := hc.writeCtl(&h)
		if err == nil {
			err = hc.flushDirect()
		}
		hc.mu.Lock()
		hc.endDirectLocked(err)
	} else {
		hc.queueCtlLocked(h)
	}
	stop := flowctx.AfterFunc(ctx, func() {
		hc.mu.Lock()
		st.cond.Broadcast()
		hc.mu.Unlock()
	})
	for !st.responded && st.err == nil && hc.werr == nil && ctx.Err() == nil {
		st.cond.Wait()
	}
	stop()
	switch {
	case st.responded && st.status == http.StatusOK:
		hc.mu.Unlock()
		return st, nil
	case st.responded:
		status := st.status
		hc.mu.Unlock()
		st.Close()
		return nil, &RefusedError{Status: status}
	}
	err := st.err
	if err == nil {
		err = hc.werr
	}
	if err == nil {
		err = ctx.Err()
	}
	hc.mu.Unlock()
	st.abort(http2.ErrCodeCancel, err)
	var re *ResetError
	if errors.As(err, &re) && re.Code == http2.ErrCodeRefusedStream || errors.Is(err, errRetry) {
		return nil, fmt.Errorf("%w: %w", errRetry, err)
	}
	return nil, err
}

// processResponse handles the server's HEADERS: a stream's answer, or
// trailers that end its data.
func (hc *h2conn) processResponse(f *http2.MetaHeadersFrame) bool {
	hc.mu.Lock()
	st := hc.streams[f.StreamID]
	if st == nil {
		known := hc.knownStreamLocked(f.StreamID)
		hc.mu.Unlock()
		if !known {
			return hc.connError(http2.ErrCodeProtocol)
		}
		return true
	}
	if st.responded {
		// Trailers: accepted only as the end of the server's data.
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
	status, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || status < 100 || status > 999 || f.Truncated {
		hc.mu.Unlock()
		st.abort(http2.ErrCodeProtocol, fmt.Errorf("%w: malformed response (status %q)", ErrStreamClosed, f.PseudoValue("status")))
		return true
	}
	if status < 200 {
		hc.mu.Unlock() // an interim answer: the final one follows
		return true
	}
	st.responded, st.status = true, status
	if f.StreamEnded() {
		st.recvEOF = true
		hc.maybeRemoveLocked(st)
	}
	st.cond.Broadcast()
	hc.mu.Unlock()
	return true
}

// processServerReset handles the server's RST_STREAM. What the server
// sent before it can still be read; then Read fails with a *ResetError.
func (hc *h2conn) processServerReset(f *http2.RSTStreamFrame) bool {
	hc.mu.Lock()
	st := hc.streams[f.StreamID]
	if st == nil {
		hc.mu.Unlock()
		return true
	}
	if st.err == nil {
		st.err = &ResetError{Code: f.ErrCode}
	}
	st.cond.Broadcast()
	hc.maybeRemoveLocked(st)
	step := st.pushStepLocked()
	hc.mu.Unlock()
	st.pushRun(step, false)
	return true
}

// processGoAway handles the server's GOAWAY: no new stream on the
// connection, and the streams it will not process fail so that their
// CONNECT can go elsewhere.
func (hc *h2conn) processGoAway(f *http2.GoAwayFrame) {
	hc.mu.Lock()
	hc.cl.goAwayRecv = true
	var lost []*Stream
	for id, st := range hc.streams {
		if id > f.LastStreamID {
			lost = append(lost, st)
		}
	}
	hc.mu.Unlock()
	for _, st := range lost {
		st.abort(0, fmt.Errorf("%w: GOAWAY (%v) before the server processed it", errRetry, f.ErrCode))
	}
}

// keepalive sends a PING when nothing arrived for KeepaliveInterval, and
// closes the connection when its answer takes more than
// KeepaliveTimeout.
func (hc *h2conn) keepalive() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.closed {
		return
	}
	seen := hc.framesRead.Load()
	switch {
	case hc.cl.pingOut && seen == hc.cl.seenFrames:
		hc.log.Debug("hbone: keepalive timeout, closing the connection", "remote", hc.info.Remote)
		hc.closeConn()
		return
	case hc.cl.pingOut || seen != hc.cl.seenFrames:
		// The peer is alive.
		hc.cl.pingOut = false
		hc.cl.seenFrames = seen
		hc.cl.keepalive.Reset(hc.t.KeepaliveInterval)
	default:
		hc.cl.pingOut = true
		hc.queueCtlLocked(ctlFrame{kind: ctlPing, data: [8]byte{'k', 'e', 'e', 'p', 'a', 'l', 'v', 'e'}})
		hc.cl.keepalive.Reset(hc.t.KeepaliveTimeout)
	}
}
