package hbone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// serverConn is one HTTP/2 connection. Three kinds of goroutines work on
// it: the read loop (serve), one writer (writeLoop) and the handlers.
//
// The read loop never waits for the network to take a write: what it has
// to send (acks, window updates, resets, GOAWAY, refusals) is queued for
// the writer, in a queue bounded by maxPeerCtl. So however full the TCP
// connection is towards the client, the server keeps reading from it, and
// a client whose own reader waits for its writer cannot deadlock with us.
// The writer sends queued control frames first, then DATA: a Stream.Write
// hands its buffer to the writer, which cuts DATA frames from it within
// both flow-control windows, one frame per ready stream in turn, and
// wakes the Write once its buffer is sent (no copy besides the TLS
// record's, no goroutine per frame).
type serverConn struct {
	srv        *Server
	t          Tuning
	log        *slog.Logger
	nc         net.Conn
	info       *Conn
	fr         *http2.Framer // reads: the read loop; writes: the writer
	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup // handlers
	idle       *time.Timer
	life       *time.Timer
	writerDone chan struct{}

	// Read loop only.
	resets bucket // premature resets (ErrRapidReset)
	flood  bucket // frames without work (ErrFrameFlood)

	// Writer only.
	fw   frameWriter
	henc *hpack.Encoder
	hbuf bytes.Buffer
	hdr  [9]byte

	mu             sync.Mutex
	wcond          sync.Cond // the writer: work queued, or closing
	ctl            ring[ctlFrame]
	ready          ring[*Stream] // streams with data or END_STREAM to send
	peerCtl        int           // queued answers to the client
	connWU         int64         // connection WINDOW_UPDATE to send
	connWUQueued   bool
	hencLimit      uint32 // SETTINGS_HEADER_TABLE_SIZE to apply (hencLimitSet)
	hencLimitSet   bool
	werr           error // the writer failed: the connection is dead
	wclosing       bool  // the writer closes the connection once idle
	wbusy          bool  // the writer or a handler (directLocked) writes
	streams        map[uint32]*Stream
	running        int // handlers not returned: what MaxConcurrentStreams counts
	lastStreamID   uint32
	connSendWindow int64
	peerInitWindow int64
	peerMaxFrame   int
	connRecvWindow int64 // what the peer may still send on the connection
	connUnacked    int64 // consumed, not yet granted back
	closed         bool
	goingAway      bool
	drain          *time.Timer
}

func (sc *serverConn) serve() {
	defer sc.teardown()
	sc.mu.Lock()
	sc.queueCtlLocked(ctlFrame{kind: ctlSettings})
	if !time.Now().Before(sc.info.Expires) {
		sc.goAwayLocked(http2.ErrCodeNo)
	}
	sc.mu.Unlock()
	go sc.writeLoop()
	for {
		f, err := sc.fr.ReadFrame()
		if err != nil {
			if !sc.readError(err) {
				return
			}
			continue
		}
		if !sc.processFrame(f) {
			return
		}
	}
}

// readError handles an error of ReadFrame; false ends the connection.
func (sc *serverConn) readError(err error) bool {
	var se http2.StreamError
	if errors.As(err, &se) {
		sc.mu.Lock()
		st := sc.streams[se.StreamID]
		isNew := st == nil && se.StreamID > sc.lastStreamID && se.StreamID%2 == 1
		if isNew {
			sc.lastStreamID = se.StreamID
		}
		sc.mu.Unlock()
		if isNew {
			return sc.refuse(se.StreamID, false, http.StatusBadRequest, fmt.Errorf("hbone: %w: %v", ErrMalformed, se.Cause))
		}
		if st != nil {
			st.abort(se.Code, ErrStreamClosed)
			return true
		}
		return sc.queuePeer(ctlFrame{kind: ctlRST, id: se.StreamID, code: se.Code})
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		sc.log.Debug("hbone: connection error", "remote", sc.info.Remote, "code", http2.ErrCode(ce))
		sc.goAway(http2.ErrCode(ce))
		if sc.srv.Refused != nil {
			detail := ""
			if http2.ErrCode(ce) == http2.ErrCodeCompression {
				detail = " (undecodable header block, or one field beyond the header limit)"
			}
			sc.srv.Refused(sc.info, fmt.Errorf("hbone: %w: connection error %v%s", ErrMalformed, http2.ErrCode(ce), detail))
		}
	}
	return false
}

func (sc *serverConn) connError(code http2.ErrCode) bool {
	return sc.readError(http2.ConnectionError(code))
}

// calm ends the connection of an abusive client: GOAWAY with
// ENHANCE_YOUR_CALM, Refused, and false for the read loop, which then
// closes the connection once the GOAWAY is written (at most flushTimeout).
func (sc *serverConn) calm(sentinel error, detail string) bool {
	err := fmt.Errorf("hbone: %w: %s from %s (%s)", sentinel, sc.info.PeerID, sc.info.Remote, detail)
	sc.log.Debug("hbone: closing abusive connection", "remote", sc.info.Remote, "peer", sc.info.PeerID, "error", err)
	sc.goAway(http2.ErrCodeEnhanceYourCalm)
	if sc.srv.Refused != nil {
		sc.srv.Refused(sc.info, err)
	}
	return false
}

// noWork charges one frame that makes no tunnel work against the flood
// budget; false ends the connection.
func (sc *serverConn) noWork(what string) bool {
	if sc.flood.take(time.Now(), sc.t.FloodRate, sc.t.FloodBurst) {
		return true
	}
	return sc.calm(ErrFrameFlood, fmt.Sprintf("%s beyond %d at %g/s", what, sc.t.FloodBurst, sc.t.FloodRate))
}

// queuePeer queues an answer to the client; false (and the connection
// closed as a flood) when too many answers wait for a client that does
// not read them.
func (sc *serverConn) queuePeer(f ctlFrame) bool {
	sc.mu.Lock()
	if sc.peerCtl >= maxPeerCtl {
		sc.mu.Unlock()
		return sc.calm(ErrFrameFlood, fmt.Sprintf("%d answers unread", maxPeerCtl))
	}
	f.peer = true
	sc.peerCtl++
	sc.queueCtlLocked(f)
	sc.mu.Unlock()
	return true
}

// processFrame handles one frame; false ends the connection.
func (sc *serverConn) processFrame(f http2.Frame) bool {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return true
		}
		if !sc.noWork("SETTINGS") {
			return false
		}
		sc.mu.Lock()
		err := f.ForeachSetting(func(s http2.Setting) error {
			if err := s.Valid(); err != nil {
				return err
			}
			switch s.ID {
			case http2.SettingInitialWindowSize:
				delta := int64(s.Val) - sc.peerInitWindow
				sc.peerInitWindow = int64(s.Val)
				for _, st := range sc.streams {
					st.sendWindow += delta
					if delta > 0 {
						sc.readyLocked(st)
					}
				}
			case http2.SettingMaxFrameSize:
				sc.peerMaxFrame = int(s.Val)
			case http2.SettingHeaderTableSize:
				sc.hencLimit, sc.hencLimitSet = s.Val, true
			}
			return nil
		})
		sc.mu.Unlock()
		if err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return sc.connError(http2.ErrCode(ce))
			}
			return sc.connError(http2.ErrCodeProtocol)
		}
		return sc.queuePeer(ctlFrame{kind: ctlSettingsAck})
	case *http2.MetaHeadersFrame:
		return sc.processHeaders(f)
	case *http2.DataFrame:
		return sc.processData(f)
	case *http2.WindowUpdateFrame:
		return sc.processWindowUpdate(f)
	case *http2.RSTStreamFrame:
		sc.mu.Lock()
		st := sc.streams[f.StreamID]
		premature := st != nil && !st.responded
		sc.mu.Unlock()
		if st == nil {
			return true
		}
		st.abort(0, &ResetError{Code: f.ErrCode})
		if premature && !sc.resets.take(time.Now(), sc.t.ResetRate, sc.t.ResetBurst) {
			return sc.calm(ErrRapidReset, fmt.Sprintf("more than %d streams reset before their answer, at %g/s", sc.t.ResetBurst, sc.t.ResetRate))
		}
	case *http2.PingFrame:
		if f.IsAck() {
			return true
		}
		if !sc.noWork("PING") {
			return false
		}
		return sc.queuePeer(ctlFrame{kind: ctlPingAck, data: f.Data})
	case *http2.GoAwayFrame:
		sc.log.Debug("hbone: peer sent GOAWAY", "remote", sc.info.Remote, "code", f.ErrCode)
	case *http2.PushPromiseFrame:
		return sc.connError(http2.ErrCodeProtocol)
	default: // PRIORITY, unknown extension frames
		return sc.noWork("frame " + f.Header().Type.String())
	}
	return true
}

func (sc *serverConn) processHeaders(f *http2.MetaHeadersFrame) bool {
	id := f.StreamID
	sc.mu.Lock()
	if st := sc.streams[id]; st != nil {
		// Trailers: accepted only as the end of the client's data.
		sc.mu.Unlock()
		if !f.StreamEnded() {
			st.abort(http2.ErrCodeProtocol, ErrStreamClosed)
			return true
		}
		sc.mu.Lock()
		st.recvEOF = true
		st.cond.Broadcast()
		sc.maybeRemoveLocked(st)
		sc.mu.Unlock()
		return true
	}
	if id%2 == 0 || id <= sc.lastStreamID {
		sc.mu.Unlock()
		return sc.connError(http2.ErrCodeProtocol)
	}
	sc.lastStreamID = id
	if sc.goingAway || sc.closed {
		sc.mu.Unlock()
		return sc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeRefusedStream})
	}
	if sc.running >= int(sc.t.MaxConcurrentStreams) {
		sc.mu.Unlock()
		if !sc.noWork("streams beyond the concurrency limit") ||
			!sc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeRefusedStream}) {
			return false
		}
		if sc.srv.Refused != nil {
			sc.srv.Refused(sc.info, fmt.Errorf("hbone: %w (%d)", ErrStreamLimit, sc.t.MaxConcurrentStreams))
		}
		return true
	}
	sc.mu.Unlock()

	switch method := f.PseudoValue("method"); {
	case f.Truncated:
		return sc.refuse(id, f.StreamEnded(), http.StatusRequestHeaderFieldsTooLarge,
			fmt.Errorf("hbone: %w (limit %d bytes)", ErrHeadersTooLarge, sc.t.MaxHeaderListSize))
	case method != http.MethodConnect:
		return sc.refuse(id, f.StreamEnded(), http.StatusBadRequest, fmt.Errorf("hbone: %w: %q", ErrNotConnect, method))
	case f.PseudoValue("authority") == "" || f.PseudoValue("path") != "" ||
		f.PseudoValue("scheme") != "" || f.PseudoValue("protocol") != "":
		return sc.refuse(id, f.StreamEnded(), http.StatusBadRequest,
			fmt.Errorf("hbone: %w: CONNECT needs :authority and no :path, :scheme or :protocol", ErrMalformed))
	}
	st := &Stream{
		Conn:      sc.info,
		Authority: f.PseudoValue("authority"),
		Header:    make(http.Header, len(f.Fields)),
		sc:        sc,
		id:        id,
	}
	for _, hf := range f.RegularFields() {
		k := http.CanonicalHeaderKey(hf.Name)
		st.Header[k] = append(st.Header[k], hf.Value)
	}
	st.cond.L = &sc.mu
	st.ctx, st.cancel = context.WithCancelCause(sc.ctx)
	sc.mu.Lock()
	st.recvWindow = int64(sc.t.StreamWindow)
	st.sendWindow = sc.peerInitWindow
	st.recvEOF = f.StreamEnded()
	sc.streams[id] = st
	sc.running++
	sc.idle.Stop()
	sc.wg.Add(1)
	sc.mu.Unlock()
	go sc.runHandler(st)
	return true
}

func (sc *serverConn) runHandler(st *Stream) {
	defer sc.wg.Done()
	defer sc.handlerDone(st)
	defer st.Close()
	if sc.srv.Handler == nil {
		_ = st.Respond(http.StatusServiceUnavailable)
		return
	}
	sc.srv.Handler(st.ctx, st)
	sc.mu.Lock()
	responded := st.responded
	sc.mu.Unlock()
	if !responded {
		_ = st.Respond(http.StatusInternalServerError)
	}
}

// handlerDone releases the stream's charge once its handler returned.
func (sc *serverConn) handlerDone(st *Stream) {
	st.cancel(nil)
	sc.mu.Lock()
	sc.running--
	if sc.running == 0 {
		if sc.goingAway {
			sc.closeWhenFlushedLocked()
		} else if !sc.closed {
			sc.idle.Reset(sc.t.IdleTimeout)
		}
	}
	sc.mu.Unlock()
}

// refuse answers a stream the server will not register: status with
// END_STREAM, then RST_STREAM(NO_ERROR) if the client is still sending.
// false ends the connection (a flood of refused requests).
func (sc *serverConn) refuse(id uint32, clientDone bool, status int, err error) bool {
	if !sc.noWork("refused requests") || !sc.queuePeer(ctlFrame{kind: ctlHeaders, id: id, val: uint32(status), end: true}) {
		return false
	}
	if !clientDone && !sc.queuePeer(ctlFrame{kind: ctlRST, id: id, code: http2.ErrCodeNo}) {
		return false
	}
	sc.log.Debug("hbone: refused request", "remote", sc.info.Remote, "status", status, "reason", err)
	if sc.srv.Refused != nil {
		sc.srv.Refused(sc.info, err)
	}
	return true
}

func (sc *serverConn) onIdle() {
	sc.mu.Lock()
	idle := sc.running == 0 && !sc.closed
	sc.mu.Unlock()
	if idle {
		sc.log.Debug("hbone: closing idle connection", "remote", sc.info.Remote)
		sc.goAway(http2.ErrCodeNo)
	}
}

// onExpired ends the connection's life (Conn.Expires): no new stream, and
// the open ones get Tuning.DrainTimeout before the connection is closed.
func (sc *serverConn) onExpired() {
	sc.log.Debug("hbone: connection reached its end of life", "remote", sc.info.Remote, "peer", sc.info.PeerID,
		"expires", sc.info.Expires)
	sc.goAway(http2.ErrCodeNo)
}

// goAway sends GOAWAY with code and closes the connection once no handler
// is left; for NO_ERROR the open streams get Tuning.DrainTimeout.
func (sc *serverConn) goAway(code http2.ErrCode) {
	sc.mu.Lock()
	sc.goAwayLocked(code)
	sc.mu.Unlock()
}

func (sc *serverConn) goAwayLocked(code http2.ErrCode) {
	// A graceful GOAWAY is sent once; an error may follow it.
	if sc.closed || sc.goingAway && code == http2.ErrCodeNo {
		return
	}
	again := sc.goingAway
	sc.goingAway = true
	sc.queueCtlLocked(ctlFrame{kind: ctlGoAway, id: sc.lastStreamID, code: code})
	if sc.running == 0 {
		sc.closeWhenFlushedLocked()
		return
	}
	if code == http2.ErrCodeNo && !again {
		sc.drain = time.AfterFunc(sc.t.DrainTimeout, func() {
			sc.log.Debug("hbone: drain timeout, closing the connection", "remote", sc.info.Remote)
			sc.nc.Close()
		})
	}
}

// closeWhenFlushedLocked makes the writer close the connection once it
// has written what is queued.
func (sc *serverConn) closeWhenFlushedLocked() {
	sc.wclosing = true
	sc.wcond.Signal()
}

func (sc *serverConn) teardown() {
	sc.idle.Stop()
	sc.life.Stop()
	sc.mu.Lock()
	if sc.drain != nil {
		sc.drain.Stop()
	}
	sc.closed = true
	for _, st := range sc.streams {
		if st.err == nil {
			st.err = fmt.Errorf("%w: connection closed", ErrStreamClosed)
		}
		st.q.reset()
		st.cond.Broadcast()
		st.cancel(st.err)
	}
	sc.closeWhenFlushedLocked()
	sc.mu.Unlock()
	// Let the writer send what is queued (a GOAWAY), briefly.
	t := time.AfterFunc(flushTimeout, func() { sc.nc.Close() })
	<-sc.writerDone
	t.Stop()
	sc.nc.Close()
	sc.cancel()
	sc.wg.Wait()
}

// bucket is a token bucket: burst tokens, refilled at rate per second.
type bucket struct {
	tokens float64
	last   time.Time
}

// take removes a token; false when none is left.
func (b *bucket) take(now time.Time, rate float64, burst int) bool {
	if b.last.IsZero() {
		b.tokens = float64(burst)
	} else {
		b.tokens = min(float64(burst), b.tokens+now.Sub(b.last).Seconds()*rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
