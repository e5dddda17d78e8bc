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
}

// Server serves HBONE CONNECT streams on TLS connections whose handshake is
// complete (see ServerConfig). Set the fields before the first ServeConn.
type Server struct {
	// Tuning sets windows, frame and header limits; zero fields take
	// defaults.
	Tuning Tuning
	// Handler runs in its own goroutine for every CONNECT stream that
	// passed the protocol checks. It must call Respond, then may Read and
	// Write; the stream is closed when Handler returns.
	Handler func(ctx context.Context, s *Stream)
	// Refused, if set, is called after the server answered a request it
	// refused by itself; err wraps ErrNotConnect, ErrHTTP1,
	// ErrHeadersTooLarge, ErrMalformed or ErrStreamLimit.
	Refused func(c *Conn, err error)
	// Logger receives connection-level debug events; nil discards them.
	Logger *slog.Logger

	mu       sync.Mutex
	conns    map[*serverConn]struct{}
	shutdown bool
}

var clientPreface = []byte(http2.ClientPreface)

// ServeConn serves HBONE on tc, which must have completed its handshake
// with a configuration from ServerConfig. It returns when the connection
// is closed, after every handler on it returned. Cancelling ctx closes the
// connection.
func (s *Server) ServeConn(ctx context.Context, tc *tls.Conn) {
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
		fr:             http2.NewFramer(tc, br),
		streams:        make(map[uint32]*Stream),
		connSendWindow: 65535,
		peerInitWindow: 65535,
		peerMaxFrame:   16384,
		connRecvWindow: int64(t.ConnWindow),
		ctx:            ctx,
	}
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
		sc.goAway()
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

// serverConn is one HTTP/2 connection.
type serverConn struct {
	srv  *Server
	t    Tuning
	log  *slog.Logger
	nc   net.Conn
	info *Conn
	fr   *http2.Framer
	ctx  context.Context
	wg   sync.WaitGroup // handlers
	idle *time.Timer

	wmu  sync.Mutex // frame writes and the hpack encoder; never taken under mu
	henc *hpack.Encoder
	hbuf bytes.Buffer

	mu             sync.Mutex
	streams        map[uint32]*Stream
	lastStreamID   uint32
	connSendWindow int64
	peerInitWindow int64
	peerMaxFrame   int
	connRecvWindow int64 // what the peer may still send on the connection
	connUnacked    int64 // consumed, not yet granted back
	closed         bool
	goingAway      bool
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

	sc   *serverConn
	id   uint32
	cond sync.Cond // on sc.mu: data, window, or state changed

	// guarded by sc.mu
	q          recvQueue
	recvWindow int64
	unacked    int64
	sendWindow int64
	recvEOF    bool
	responded  bool
	status     int
	sentEnd    bool
	err        error // reset or connection closed
	removed    bool
}

func (sc *serverConn) serve() {
	defer sc.teardown()
	sc.writeFrame(func(fr *http2.Framer) error {
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
	})
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
			sc.refuse(se.StreamID, false, http.StatusBadRequest, fmt.Errorf("hbone: %w: %v", ErrMalformed, se.Cause))
			return true
		}
		if st != nil {
			st.abort(se.Code, ErrStreamClosed)
		} else {
			sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteRSTStream(se.StreamID, se.Code) })
		}
		return true
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		sc.log.Debug("hbone: connection error", "remote", sc.info.Remote, "code", http2.ErrCode(ce))
		sc.mu.Lock()
		last := sc.lastStreamID
		sc.mu.Unlock()
		sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteGoAway(last, http2.ErrCode(ce), nil) })
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

// processFrame handles one frame; false ends the connection.
func (sc *serverConn) processFrame(f http2.Frame) bool {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return true
		}
		err := f.ForeachSetting(func(s http2.Setting) error {
			switch s.ID {
			case http2.SettingInitialWindowSize:
				sc.mu.Lock()
				delta := int64(s.Val) - sc.peerInitWindow
				sc.peerInitWindow = int64(s.Val)
				for _, st := range sc.streams {
					st.sendWindow += delta
					st.cond.Broadcast()
				}
				sc.mu.Unlock()
			case http2.SettingMaxFrameSize:
				sc.mu.Lock()
				sc.peerMaxFrame = int(s.Val)
				sc.mu.Unlock()
			case http2.SettingHeaderTableSize:
				sc.wmu.Lock()
				sc.henc.SetMaxDynamicTableSizeLimit(s.Val)
				sc.wmu.Unlock()
			}
			return nil
		})
		if err != nil {
			return sc.connError(http2.ErrCodeProtocol)
		}
		return sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteSettingsAck() }) == nil
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
			for _, st := range sc.streams {
				st.cond.Broadcast()
			}
		} else if st := sc.streams[f.StreamID]; st != nil {
			st.sendWindow += int64(f.Increment)
			st.cond.Broadcast()
		}
		sc.mu.Unlock()
	case *http2.RSTStreamFrame:
		sc.mu.Lock()
		st := sc.streams[f.StreamID]
		sc.mu.Unlock()
		if st != nil {
			st.abort(0, &ResetError{Code: f.ErrCode})
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			data := f.Data
			return sc.writeFrame(func(fr *http2.Framer) error { return fr.WritePing(true, data) }) == nil
		}
	case *http2.GoAwayFrame:
		sc.log.Debug("hbone: peer sent GOAWAY", "remote", sc.info.Remote, "code", f.ErrCode)
	case *http2.PushPromiseFrame:
		return sc.connError(http2.ErrCodeProtocol)
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
		sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		return true
	}
	if len(sc.streams) >= int(sc.t.MaxConcurrentStreams) {
		sc.mu.Unlock()
		sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		if sc.srv.Refused != nil {
			sc.srv.Refused(sc.info, fmt.Errorf("hbone: %w (%d)", ErrStreamLimit, sc.t.MaxConcurrentStreams))
		}
		return true
	}
	sc.mu.Unlock()

	switch method := f.PseudoValue("method"); {
	case f.Truncated:
		sc.refuse(id, f.StreamEnded(), http.StatusRequestHeaderFieldsTooLarge,
			fmt.Errorf("hbone: %w (limit %d bytes)", ErrHeadersTooLarge, sc.t.MaxHeaderListSize))
		return true
	case method != http.MethodConnect:
		sc.refuse(id, f.StreamEnded(), http.StatusBadRequest, fmt.Errorf("hbone: %w: %q", ErrNotConnect, method))
		return true
	case f.PseudoValue("authority") == "" || f.PseudoValue("path") != "" ||
		f.PseudoValue("scheme") != "" || f.PseudoValue("protocol") != "":
		sc.refuse(id, f.StreamEnded(), http.StatusBadRequest,
			fmt.Errorf("hbone: %w: CONNECT needs :authority and no :path, :scheme or :protocol", ErrMalformed))
		return true
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
	sc.mu.Lock()
	st.recvWindow = int64(sc.t.StreamWindow)
	st.sendWindow = sc.peerInitWindow
	st.recvEOF = f.StreamEnded()
	sc.streams[id] = st
	sc.idle.Stop()
	sc.wg.Add(1)
	sc.mu.Unlock()
	go sc.runHandler(st)
	return true
}

func (sc *serverConn) runHandler(st *Stream) {
	defer sc.wg.Done()
	defer st.Close()
	if sc.srv.Handler == nil {
		_ = st.Respond(http.StatusServiceUnavailable)
		return
	}
	sc.srv.Handler(sc.ctx, st)
	sc.mu.Lock()
	responded := st.responded
	sc.mu.Unlock()
	if !responded {
		_ = st.Respond(http.StatusInternalServerError)
	}
}

// refuse answers a stream the server will not register: status with
// END_STREAM, then RST_STREAM(NO_ERROR) if the client is still sending.
func (sc *serverConn) refuse(id uint32, clientDone bool, status int, err error) {
	sc.writeFrame(func(fr *http2.Framer) error {
		if err := sc.writeHeadersLocked(id, status, true); err != nil {
			return err
		}
		if !clientDone {
			return fr.WriteRSTStream(id, http2.ErrCodeNo)
		}
		return nil
	})
	sc.log.Debug("hbone: refused request", "remote", sc.info.Remote, "status", status, "reason", err)
	if sc.srv.Refused != nil {
		sc.srv.Refused(sc.info, err)
	}
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
		inc := sc.creditConnLocked(n)
		sc.mu.Unlock()
		if !known {
			return sc.connError(http2.ErrCodeProtocol)
		}
		return sc.sendWindowUpdates(0, 0, inc)
	}
	st.recvWindow -= n
	if st.recvWindow < 0 {
		sc.mu.Unlock()
		st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
		return true
	}
	st.q.write(data)
	var streamInc, connInc int64
	if pad := n - int64(len(data)); pad > 0 {
		st.unacked += pad
		streamInc, connInc = sc.grantLocked(st, pad)
	}
	if f.StreamEnded() {
		st.recvEOF = true
	}
	st.cond.Broadcast()
	sc.mu.Unlock()
	return sc.sendWindowUpdates(id, streamInc, connInc)
}

// creditConnLocked records n bytes consumed on the connection and returns
// the WINDOW_UPDATE increment to send now (0 for none).
func (sc *serverConn) creditConnLocked(n int64) int64 {
	sc.connUnacked += n
	if sc.connUnacked < int64(sc.t.ConnWindow)/4 {
		return 0
	}
	inc := sc.connUnacked
	sc.connUnacked = 0
	sc.connRecvWindow += inc
	return inc
}

// grantLocked records n bytes of st consumed; it returns the stream and
// connection window increments to send now.
func (sc *serverConn) grantLocked(st *Stream, n int64) (streamInc, connInc int64) {
	connInc = sc.creditConnLocked(n)
	if st.recvEOF || st.err != nil {
		return 0, connInc
	}
	if st.unacked >= int64(sc.t.StreamWindow)/4 {
		streamInc = st.unacked
		st.unacked = 0
		st.recvWindow += streamInc
	}
	return streamInc, connInc
}

func (sc *serverConn) sendWindowUpdates(id uint32, streamInc, connInc int64) bool {
	if streamInc == 0 && connInc == 0 {
		return true
	}
	return sc.writeFrame(func(fr *http2.Framer) error {
		if connInc > 0 {
			if err := fr.WriteWindowUpdate(0, uint32(connInc)); err != nil {
				return err
			}
		}
		if streamInc > 0 {
			return fr.WriteWindowUpdate(id, uint32(streamInc))
		}
		return nil
	}) == nil
}

// writeFrame runs w with the write lock held. A write error closes the
// connection (the reader then tears it down).
func (sc *serverConn) writeFrame(w func(fr *http2.Framer) error) error {
	sc.wmu.Lock()
	err := w(sc.fr)
	sc.wmu.Unlock()
	if err != nil {
		sc.nc.Close()
	}
	return err
}

// writeHeadersLocked writes a response HEADERS frame; wmu must be held.
func (sc *serverConn) writeHeadersLocked(id uint32, status int, end bool) error {
	sc.hbuf.Reset()
	_ = sc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	return sc.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: sc.hbuf.Bytes(), EndStream: end, EndHeaders: true,
	})
}

// maybeRemoveLocked forgets st once both directions are done or it failed.
func (sc *serverConn) maybeRemoveLocked(st *Stream) {
	if st.removed || !(st.err != nil || st.recvEOF && st.sentEnd) {
		return
	}
	st.removed = true
	delete(sc.streams, st.id)
	if len(sc.streams) == 0 {
		if sc.goingAway {
			sc.nc.Close()
		} else if !sc.closed {
			sc.idle.Reset(sc.t.IdleTimeout)
		}
	}
}

func (sc *serverConn) onIdle() {
	sc.mu.Lock()
	idle := len(sc.streams) == 0 && !sc.closed
	sc.mu.Unlock()
	if idle {
		sc.log.Debug("hbone: closing idle connection", "remote", sc.info.Remote)
		sc.goAway()
	}
}

// goAway sends GOAWAY and closes the connection once no stream is left.
func (sc *serverConn) goAway() {
	sc.mu.Lock()
	if sc.goingAway || sc.closed {
		sc.mu.Unlock()
		return
	}
	sc.goingAway = true
	last := sc.lastStreamID
	empty := len(sc.streams) == 0
	sc.mu.Unlock()
	sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	if empty {
		sc.nc.Close()
	}
}

func (sc *serverConn) teardown() {
	sc.nc.Close()
	sc.idle.Stop()
	sc.mu.Lock()
	sc.closed = true
	for _, st := range sc.streams {
		if st.err == nil {
			st.err = fmt.Errorf("%w: connection closed", ErrStreamClosed)
		}
		st.q.reset()
		st.cond.Broadcast()
	}
	sc.mu.Unlock()
	sc.wg.Wait()
}

// ID returns the HTTP/2 stream ID.
func (st *Stream) ID() uint32 { return st.id }

// Respond sends the response status. 200 opens the tunnel; any other
// status ends the stream.
func (st *Stream) Respond(status int) error {
	sc := st.sc
	sc.mu.Lock()
	if st.responded {
		sc.mu.Unlock()
		return errors.New("hbone: response already sent")
	}
	if st.err != nil {
		err := st.err
		sc.mu.Unlock()
		return err
	}
	st.responded, st.status = true, status
	end := status != http.StatusOK
	clientDone := st.recvEOF
	sc.mu.Unlock()
	err := sc.writeFrame(func(fr *http2.Framer) error {
		if err := sc.writeHeadersLocked(st.id, status, end); err != nil {
			return err
		}
		if end && !clientDone {
			return fr.WriteRSTStream(st.id, http2.ErrCodeNo)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("hbone: respond: %w", err)
	}
	if end {
		sc.mu.Lock()
		st.sentEnd = true
		if st.err == nil && !clientDone {
			st.err = ErrStreamClosed
		}
		sc.maybeRemoveLocked(st)
		sc.mu.Unlock()
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
	for st.q.n == 0 && !st.recvEOF && st.err == nil {
		st.cond.Wait()
	}
	if st.q.n == 0 {
		err := st.err
		if err == nil {
			err = io.EOF
		}
		sc.mu.Unlock()
		return 0, err
	}
	n := st.q.read(p)
	st.unacked += int64(n)
	streamInc, connInc := sc.grantLocked(st, int64(n))
	sc.maybeRemoveLocked(st)
	sc.mu.Unlock()
	sc.sendWindowUpdates(st.id, streamInc, connInc)
	return n, nil
}

// Write sends p to the client as DATA frames, within the flow-control
// windows. It fails before a 200 response and after CloseWrite.
func (st *Stream) Write(p []byte) (int, error) {
	sc := st.sc
	written := 0
	for len(p) > 0 {
		sc.mu.Lock()
		for st.err == nil && !st.sentEnd && !sc.closed && (st.sendWindow <= 0 || sc.connSendWindow <= 0) {
			st.cond.Wait()
		}
		switch {
		case st.err != nil:
			err := st.err
			sc.mu.Unlock()
			return written, err
		case sc.closed:
			sc.mu.Unlock()
			return written, ErrStreamClosed
		case !st.responded || st.status != http.StatusOK:
			sc.mu.Unlock()
			return written, errors.New("hbone: write before a 200 response")
		case st.sentEnd:
			sc.mu.Unlock()
			return written, errors.New("hbone: write after CloseWrite")
		}
		n := min(int64(len(p)), st.sendWindow, sc.connSendWindow, int64(sc.peerMaxFrame))
		st.sendWindow -= n
		sc.connSendWindow -= n
		sc.mu.Unlock()
		if err := sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteData(st.id, false, p[:n]) }); err != nil {
			return written, fmt.Errorf("hbone: write: %w", err)
		}
		written += int(n)
		p = p[n:]
	}
	return written, nil
}

// CloseWrite half-closes the stream (END_STREAM): the client reads EOF and
// may keep sending.
func (st *Stream) CloseWrite() error {
	sc := st.sc
	sc.mu.Lock()
	if st.sentEnd || st.err != nil {
		sc.mu.Unlock()
		return nil
	}
	if !st.responded {
		sc.mu.Unlock()
		return errors.New("hbone: CloseWrite before Respond")
	}
	st.sentEnd = true
	sc.mu.Unlock()
	err := sc.writeFrame(func(fr *http2.Framer) error { return fr.WriteData(st.id, true, nil) })
	sc.mu.Lock()
	sc.maybeRemoveLocked(st)
	sc.mu.Unlock()
	return err
}

// Close ends the stream; if either direction is still open, the stream is
// reset (CANCEL).
func (st *Stream) Close() error {
	sc := st.sc
	sc.mu.Lock()
	if st.removed {
		sc.mu.Unlock()
		return nil
	}
	sc.mu.Unlock()
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
// is dropped and its connection window given back.
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
	dropped := int64(st.q.reset())
	connInc := sc.creditConnLocked(dropped)
	st.cond.Broadcast()
	sc.maybeRemoveLocked(st)
	closed := sc.closed
	sc.mu.Unlock()
	if closed {
		return
	}
	sc.writeFrame(func(fr *http2.Framer) error {
		if code != 0 {
			if err := fr.WriteRSTStream(st.id, code); err != nil {
				return err
			}
		}
		if connInc > 0 {
			return fr.WriteWindowUpdate(0, uint32(connInc))
		}
		return nil
	})
}
