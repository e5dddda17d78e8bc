package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Reasons the server refuses a request by itself, before the handler sees
// it. Server.Refused receives an error wrapping one of them.
var (
	// ErrNotConnect: the method is not CONNECT (answered 400).
	ErrNotConnect = errors.New("method is not CONNECT")
	// ErrHTTP1: the client speaks HTTP/1 (answered with an HTTP/1.1 400).
	ErrHTTP1 = errors.New("HTTP/1 request on the HBONE port")
	// ErrHeadersTooLarge: the header list exceeds Tuning.MaxHeaderListSize
	// (answered 431).
	ErrHeadersTooLarge = errors.New("request headers too large")
	// ErrMalformed: the request breaks HTTP/2's rules for CONNECT
	// (answered 400).
	ErrMalformed = errors.New("malformed CONNECT request")
	// ErrStreamLimit: the client opened more streams than the connection
	// allows (the stream is reset with REFUSED_STREAM).
	ErrStreamLimit = errors.New("too many concurrent streams")
	// ErrRapidReset: the client reset streams that the server was still
	// working on (before it answered them) faster than Tuning.ResetRate
	// and ResetBurst allow, the HTTP/2 "rapid reset" attack
	// (CVE-2023-44487). The connection gets GOAWAY(ENHANCE_YOUR_CALM) and
	// is closed; the error names the client's identity.
	ErrRapidReset = errors.New("client resets streams too fast (rapid reset)")
	// ErrFrameFlood: the client sent frames that make no tunnel work
	// (PING, SETTINGS, empty DATA, PRIORITY, unknown types, streams
	// refused for the concurrency limit or as malformed) faster than
	// Tuning.FloodRate and FloodBurst allow, or stopped reading while
	// such frames asked for answers. GOAWAY(ENHANCE_YOUR_CALM), then close.
	ErrFrameFlood = errors.New("client floods the connection with frames that carry no work")
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

// Conn describes the TLS connection a stream arrived on.
type Conn struct {
	// Local is the address the connection was made to (the destination
	// pod), Remote the peer's address.
	Local, Remote netip.AddrPort
	// PeerID is the SPIFFE ID of the verified client certificate: the
	// caller's only identity.
	PeerID spiffeid.ID
	// TLS is the connection's TLS state.
	TLS tls.ConnectionState
	// Expires is when the connection stops accepting streams: the
	// earliest of the client's certificate expiry, the server's (when
	// Server.LocalSVID is set) and the connection's start plus
	// Tuning.MaxConnectionAge.
	Expires time.Time
}

// Server serves HBONE CONNECT streams on TLS connections whose handshake is
// complete (see ServerConfig). Set the fields before the first ServeConn.
type Server struct {
	// Tuning sets windows, frame and header limits, abuse limits and
	// connection lifetimes; zero fields take defaults.
	Tuning Tuning
	// Handler runs in its own goroutine for every CONNECT stream that
	// passed the protocol checks. It must call Respond, then may Read and
	// Write; the stream is closed when Handler returns. Its context ends
	// when the client resets the stream or the connection closes. The
	// stream counts against Tuning.MaxConcurrentStreams until Handler
	// returns, whatever the client does.
	Handler func(ctx context.Context, s *Stream)
	// Refused, if set, is called after the server refused a request or a
	// connection by itself; err wraps ErrNotConnect, ErrHTTP1,
	// ErrHeadersTooLarge, ErrMalformed, ErrStreamLimit, ErrRapidReset or
	// ErrFrameFlood. It is called from the connection's read loop: keep it
	// quick.
	Refused func(c *Conn, err error)
	// LocalSVID, if set, returns the SVID presented on a connection to
	// local (the function given to ServerConfig). Its leaf's expiry bounds
	// the connection's life, as the client's certificate does.
	LocalSVID ServerSVIDFunc
	// Logger receives connection-level debug events; nil discards them.
	Logger *slog.Logger

	mu       sync.Mutex
	conns    map[*serverConn]struct{}
	shutdown bool
}

var clientPreface = []byte(http2.ClientPreface)

// flushTimeout bounds how long a closing connection waits for its last
// frames (a GOAWAY) to be written.
const flushTimeout = time.Second

// maxPeerCtl bounds the frames queued in answer to the client (acks,
// refusals) while it does not read them; beyond it the connection is
// closed as a flood.
const maxPeerCtl = 1024

// ServeConn serves HBONE on tc, which must have completed its handshake
// with a configuration from ServerConfig. It returns when the connection
// is closed, after every handler on it returned. Cancelling ctx closes the
// connection.
func (s *Server) ServeConn(ctx context.Context, tc *tls.Conn) {
	start := time.Now()
	t := s.Tuning.WithDefaults()
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cs := tc.ConnectionState()
	info := &Conn{TLS: cs}
	info.Local, _ = addrOf(tc.LocalAddr())
	info.Remote, _ = addrOf(tc.RemoteAddr())
	info.PeerID, _ = PeerID(cs)
	info.Expires = start.Add(t.MaxConnectionAge)
	if len(cs.PeerCertificates) > 0 && cs.PeerCertificates[0].NotAfter.Before(info.Expires) {
		info.Expires = cs.PeerCertificates[0].NotAfter
	}
	if s.LocalSVID != nil {
		if svid, err := s.LocalSVID(ctx, info.Local.Addr()); err == nil && len(svid.Certificates) > 0 &&
			svid.Certificates[0].NotAfter.Before(info.Expires) {
			info.Expires = svid.Certificates[0].NotAfter
		}
	}

	defer tc.Close()
	if cs.NegotiatedProtocol != ALPN {
		s.refuseHTTP1(tc, info)
		return
	}
	br := bufio.NewReaderSize(tc, 64<<10)
	_ = tc.SetReadDeadline(time.Now().Add(t.HandshakeTimeout))
	pre, err := br.Peek(len(clientPreface))
	if err != nil || !bytes.Equal(pre, clientPreface) {
		if err == nil || len(pre) > 0 {
			s.refuseHTTP1(tc, info)
		}
		return
	}
	_, _ = br.Discard(len(clientPreface))
	_ = tc.SetReadDeadline(time.Time{})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sc := &serverConn{
		srv:            s,
		t:              t,
		log:            log,
		nc:             tc,
		info:           info,
		fw:             frameWriter{w: tc},
		streams:        make(map[uint32]*Stream),
		connSendWindow: 65535,
		peerInitWindow: 65535,
		peerMaxFrame:   16384,
		connRecvWindow: int64(t.ConnWindow),
		ctx:            ctx,
		cancel:         cancel,
		writerDone:     make(chan struct{}),
	}
	sc.fr = http2.NewFramer(&sc.fw, br)
	sc.wcond.L = &sc.mu
	sc.henc = hpack.NewEncoder(&sc.hbuf)
	sc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	sc.fr.MaxHeaderListSize = t.MaxHeaderListSize
	sc.fr.SetMaxReadFrameSize(t.MaxFrameSize)
	sc.fr.SetReuseFrames()

	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		return
	}
	if s.conns == nil {
		s.conns = make(map[*serverConn]struct{})
	}
	s.conns[sc] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, sc)
		s.mu.Unlock()
	}()

	sc.idle = time.AfterFunc(t.IdleTimeout, sc.onIdle)
	sc.life = time.AfterFunc(time.Until(info.Expires), sc.onExpired)
	stop := context.AfterFunc(ctx, func() { tc.Close() })
	defer stop()
	sc.serve()
}

func (s *Server) refuseHTTP1(c net.Conn, info *Conn) {
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 30\r\n\r\nHBONE requires HTTP/2 CONNECT\n")
	if s.Refused != nil {
		s.Refused(info, fmt.Errorf("hbone: %w (ALPN %q)", ErrHTTP1, info.TLS.NegotiatedProtocol))
	}
}

// Shutdown stops accepting streams: every connection gets a GOAWAY and
// closes once its streams are done. If ctx ends first, the remaining
// connections are closed and ctx's error returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	conns := make([]*serverConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.goAway(http2.ErrCodeNo)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// Close closes every connection at once.
func (s *Server) Close() {
	s.mu.Lock()
	s.shutdown = true
	for sc := range s.conns {
		sc.nc.Close()
	}
	s.mu.Unlock()
}

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

// ctlKind is the kind of a queued control frame.
type ctlKind uint8

const (
	ctlSettings     ctlKind = iota // our SETTINGS and the connection window
	ctlSettingsAck                 //
	ctlPingAck                     // data
	ctlWindowUpdate                // st (nil: the connection); increment read at write time
	ctlRST                         // id, code
	ctlHeaders                     // id, status, end
	ctlGoAway                      // id (last stream), code
)

type ctlFrame struct {
	kind ctlKind
	end  bool
	peer bool // answers the client: counts against maxPeerCtl
	code http2.ErrCode
	id   uint32
	val  uint32
	st   *Stream
	data [8]byte
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
		sc.mu.Lock()
		if f.StreamID == 0 {
			sc.connSendWindow += int64(f.Increment)
			if sc.connSendWindow > 1<<31-1 {
				sc.mu.Unlock()
				return sc.connError(http2.ErrCodeFlowControl)
			}
			sc.wcond.Signal()
		} else if st := sc.streams[f.StreamID]; st != nil {
			st.sendWindow += int64(f.Increment)
			if st.sendWindow > 1<<31-1 {
				sc.mu.Unlock()
				st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
				return true
			}
			sc.readyLocked(st)
		}
		sc.mu.Unlock()
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

func (sc *serverConn) processData(f *http2.DataFrame) bool {
	id := f.StreamID
	n := int64(f.Length)
	data := f.Data()
	sc.mu.Lock()
	sc.connRecvWindow -= n
	if sc.connRecvWindow < 0 {
		sc.mu.Unlock()
		return sc.connError(http2.ErrCodeFlowControl)
	}
	st := sc.streams[id]
	if st == nil || st.recvEOF || st.err != nil {
		// A stream we closed or refused: give the connection window back.
		known := id <= sc.lastStreamID
		sc.creditConnLocked(n)
		sc.mu.Unlock()
		if !known {
			return sc.connError(http2.ErrCodeProtocol)
		}
		return true
	}
	st.recvWindow -= n
	if st.recvWindow < 0 {
		sc.mu.Unlock()
		st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
		return true
	}
	st.q.write(data)
	if pad := n - int64(len(data)); pad > 0 {
		st.unacked += pad
		sc.grantLocked(st, pad)
	}
	if f.StreamEnded() {
		st.recvEOF = true
	}
	st.cond.Broadcast()
	sc.mu.Unlock()
	if n == 0 && !f.StreamEnded() {
		return sc.noWork("empty DATA")
	}
	return true
}

// creditConnLocked records n bytes consumed on the connection and queues
// a connection WINDOW_UPDATE once a quarter of the window is consumed.
func (sc *serverConn) creditConnLocked(n int64) {
	sc.connUnacked += n
	if sc.connUnacked < int64(sc.t.ConnWindow)/4 {
		return
	}
	inc := sc.connUnacked
	sc.connUnacked = 0
	sc.connRecvWindow += inc
	sc.connWU += inc
	if !sc.connWUQueued {
		sc.connWUQueued = true
		sc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate})
	}
}

// grantLocked records n bytes of st consumed and queues the window
// updates that are due.
func (sc *serverConn) grantLocked(st *Stream, n int64) {
	sc.creditConnLocked(n)
	if st.recvEOF || st.err != nil {
		return
	}
	if st.unacked >= int64(sc.t.StreamWindow)/4 {
		inc := st.unacked
		st.unacked = 0
		st.recvWindow += inc
		st.wu += inc
		if !st.wuQueued {
			st.wuQueued = true
			sc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate, st: st})
		}
	}
}

// queueCtlLocked queues a control frame for the writer.
func (sc *serverConn) queueCtlLocked(f ctlFrame) {
	if sc.werr != nil {
		return
	}
	sc.ctl.push(f)
	sc.wcond.Signal()
}

// readyLocked puts st in the writer's round of streams if it has
// something to send.
func (sc *serverConn) readyLocked(st *Stream) {
	if st.inReady || st.err != nil || len(st.wbuf) == 0 && !st.wantEnd {
		return
	}
	st.inReady = true
	sc.ready.push(st)
	sc.wcond.Signal()
}

// writeLoop is the connection's only writer.
func (sc *serverConn) writeLoop() {
	defer close(sc.writerDone)
	sc.mu.Lock()
	for {
		if sc.werr != nil {
			break
		}
		if sc.wbusy {
			sc.wcond.Wait() // a handler writes directly
			continue
		}
		if f, ok := sc.ctl.pop(); ok {
			if f.peer {
				sc.peerCtl--
			}
			if !sc.prepareCtlLocked(&f) {
				continue
			}
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.writeCtl(&f)
			sc.mu.Lock()
			sc.wbusy = false
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			continue
		}
		if st, p, end := sc.nextDataLocked(); st != nil {
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.writeData(st.id, p, end)
			sc.mu.Lock()
			sc.wbusy = false
			st.writing = false
			st.cond.Broadcast()
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			sc.readyLocked(st)
			continue
		}
		if sc.fw.n > 0 {
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.fw.flush()
			sc.mu.Lock()
			sc.wbusy = false
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			continue
		}
		sc.fw.release()
		if sc.wclosing {
			break
		}
		sc.wcond.Wait()
	}
	closing := sc.wclosing && sc.werr == nil
	sc.mu.Unlock()
	if closing {
		sc.nc.Close()
	}
}

// directLocked lets a handler write its own frames when the writer has
// nothing queued and nobody writes: no goroutine switch on the common
// path of one busy stream. Only handlers do this, never the read loop,
// which must not wait for the network. On true the caller holds the
// write side until endDirectLocked.
func (sc *serverConn) directLocked() bool {
	if sc.wbusy || sc.werr != nil || sc.wclosing || sc.ctl.n > 0 || sc.ready.n > 0 {
		return false
	}
	sc.wbusy = true
	return true
}

// flushDirect ends a direct write: what is buffered goes out, and the
// buffer back to its pool.
func (sc *serverConn) flushDirect() error {
	err := sc.fw.flush()
	sc.fw.release()
	return err
}

// endDirectLocked gives the write side back and wakes the writer if work
// was queued meanwhile.
func (sc *serverConn) endDirectLocked(err error) {
	sc.wbusy = false
	if err != nil {
		sc.failWriteLocked(err)
		return
	}
	if sc.ctl.n > 0 || sc.ready.n > 0 || sc.wclosing {
		sc.wcond.Signal()
	}
}

// prepareCtlLocked fills in what a control frame sends at write time;
// false drops it.
func (sc *serverConn) prepareCtlLocked(f *ctlFrame) bool {
	switch f.kind {
	case ctlWindowUpdate:
		if f.st == nil {
			f.val, sc.connWU, sc.connWUQueued = uint32(sc.connWU), 0, false
		} else {
			st := f.st
			f.id, f.val, st.wu, st.wuQueued = st.id, uint32(st.wu), 0, false
			if st.err != nil || st.recvEOF {
				return false
			}
		}
		return f.val > 0
	case ctlHeaders:
		if sc.hencLimitSet {
			sc.henc.SetMaxDynamicTableSizeLimit(sc.hencLimit)
			sc.hencLimitSet = false
		}
	}
	return true
}

// writeCtl writes one control frame (writer only).
func (sc *serverConn) writeCtl(f *ctlFrame) error {
	fr := sc.fr
	switch f.kind {
	case ctlSettings:
		if err := fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.t.MaxConcurrentStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(sc.t.StreamWindow)},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: sc.t.MaxFrameSize},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: sc.t.MaxHeaderListSize},
		); err != nil {
			return err
		}
		if inc := int64(sc.t.ConnWindow) - 65535; inc > 0 {
			return fr.WriteWindowUpdate(0, uint32(inc))
		}
		return nil
	case ctlSettingsAck:
		return fr.WriteSettingsAck()
	case ctlPingAck:
		return fr.WritePing(true, f.data)
	case ctlWindowUpdate:
		return fr.WriteWindowUpdate(f.id, f.val)
	case ctlRST:
		return fr.WriteRSTStream(f.id, f.code)
	case ctlHeaders:
		sc.hbuf.Reset()
		_ = sc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusText(int(f.val))})
		return fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID: f.id, BlockFragment: sc.hbuf.Bytes(), EndStream: f.end, EndHeaders: true,
		})
	case ctlGoAway:
		return fr.WriteGoAway(f.id, f.code, nil)
	}
	return nil
}

func statusText(status int) string {
	switch status {
	case http.StatusOK:
		return "200"
	case http.StatusBadRequest:
		return "400"
	case http.StatusUnauthorized:
		return "401"
	case http.StatusServiceUnavailable:
		return "503"
	}
	return strconv.Itoa(status)
}

// nextDataLocked takes the next DATA frame to send: the first ready
// stream that may send (its window and the connection's), its payload
// (a slice of its Write's buffer, marked as being written) and whether
// END_STREAM goes with it. Streams waiting for their own window leave the
// round until a WINDOW_UPDATE puts them back.
func (sc *serverConn) nextDataLocked() (*Stream, []byte, bool) {
	for range sc.ready.n {
		st, _ := sc.ready.pop()
		st.inReady = false
		switch {
		case st.err != nil:
			continue
		case len(st.wbuf) == 0:
			if !st.wantEnd {
				continue
			}
			st.wantEnd = false
			st.writing = true
			return st, nil, true
		case st.sendWindow <= 0:
			continue
		case sc.connSendWindow <= 0:
			// Everyone with data waits for the connection's window; only
			// END_STREAM can go.
			st.inReady = true
			sc.ready.push(st)
			continue
		}
		n := min(int64(len(st.wbuf)), st.sendWindow, sc.connSendWindow, int64(sc.peerMaxFrame))
		st.sendWindow -= n
		sc.connSendWindow -= n
		p := st.wbuf[:n]
		st.wbuf = st.wbuf[n:]
		st.writing = true
		end := len(st.wbuf) == 0 && st.wantEnd
		if end {
			st.wantEnd = false
		}
		return st, p, end
	}
	return nil, nil, false
}

// writeData writes one DATA frame (writer only); the payload goes to the
// TLS connection without an intermediate copy when it is large.
func (sc *serverConn) writeData(id uint32, p []byte, end bool) error {
	h := sc.hdr[:]
	h[0], h[1], h[2] = byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
	h[3] = byte(http2.FrameData)
	h[4] = 0
	if end {
		h[4] = byte(http2.FlagDataEndStream)
	}
	h[5], h[6], h[7], h[8] = byte(id>>24)&0x7f, byte(id>>16), byte(id>>8), byte(id)
	if _, err := sc.fw.Write(h); err != nil {
		return err
	}
	_, err := sc.fw.Write(p)
	return err
}

// failWriteLocked records that the connection can no longer be written:
// it is closed, and every stream's pending Write fails.
func (sc *serverConn) failWriteLocked(err error) {
	if sc.werr == nil {
		sc.werr = fmt.Errorf("hbone: write: %w", err)
	}
	sc.nc.Close()
	for _, st := range sc.streams {
		st.cond.Broadcast()
	}
	sc.wcond.Signal()
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

// ring is a FIFO that grows as needed; it keeps up to 64 slots when empty.
type ring[T any] struct {
	buf  []T
	head int
	n    int
}

func (r *ring[T]) push(v T) {
	if r.n == len(r.buf) {
		nb := make([]T, max(8, 2*len(r.buf)))
		for i := range r.n {
			nb[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = nb, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = v
	r.n++
}

func (r *ring[T]) pop() (T, bool) {
	var zero T
	if r.n == 0 {
		return zero, false
	}
	v := r.buf[r.head]
	r.buf[r.head] = zero
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	if r.n == 0 && len(r.buf) > 64 {
		r.buf, r.head = nil, 0 // a burst is over: do not keep its storage
	}
	return v, true
}

// wbufSize is the writer's buffer: one TLS record's worth of plaintext.
const wbufSize = 16 << 10

var wbufPool = sync.Pool{New: func() any { b := make([]byte, wbufSize); return &b }}

// frameWriter buffers small frames into full TLS records and passes large
// payloads through in whole records, so TLS writes are few and full. Its
// buffer comes from a pool while there is something to write and goes
// back when the connection is idle.
type frameWriter struct {
	w   io.Writer
	buf *[]byte
	n   int
}

func (fw *frameWriter) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		if fw.n == 0 && len(p) >= wbufSize {
			k := len(p) - len(p)%wbufSize
			if _, err := fw.w.Write(p[:k]); err != nil {
				return total - len(p), err
			}
			p = p[k:]
			continue
		}
		if fw.buf == nil {
			fw.buf = wbufPool.Get().(*[]byte)
		}
		c := copy((*fw.buf)[fw.n:], p)
		fw.n += c
		p = p[c:]
		if fw.n == wbufSize {
			if err := fw.flush(); err != nil {
				return total - len(p), err
			}
		}
	}
	return total, nil
}

func (fw *frameWriter) flush() error {
	if fw.n == 0 {
		return nil
	}
	_, err := fw.w.Write((*fw.buf)[:fw.n])
	fw.n = 0
	return err
}

// release gives the buffer back to the pool (nothing must be buffered).
func (fw *frameWriter) release() {
	if fw.buf != nil && fw.n == 0 {
		wbufPool.Put(fw.buf)
		fw.buf = nil
	}
}
