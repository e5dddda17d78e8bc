package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mantlet/mantlet/internal/shrink"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2conn is one HTTP/2 connection, the server's (ServeConn) or the
// client pool's (dialConn): the streams are the same on both sides once
// opened. Three kinds of goroutines work on it: the read loop, one writer
// (writeLoop) and the streams' users (the server's handlers, the
// client's callers).
//
// The read loop never waits for the network to take a write: what it has
// to send (acks, window updates, resets, GOAWAY, refusals) is queued for
// the writer, in a queue bounded by maxPeerCtl. So however full the TCP
// connection is towards the peer, we keep reading from it, and a peer
// whose own reader waits for its writer cannot deadlock with us. The
// writer sends queued control frames first, then DATA: a Stream.Write
// hands its buffer to the writer, which cuts DATA frames from it within
// both flow-control windows, one frame per ready stream in turn, and
// wakes the Write once its buffer is sent (no copy besides the TLS
// record's, no goroutine per frame).
//
// What a connection holds: its TLS connection (which keeps one record's
// worth of input), the read loop's frame reader (no buffer: DATA
// payloads go from the TLS connection straight into the stream's
// receive queue), the writer's 16 KiB buffer only while it writes, and
// its streams. A stream holds received bytes in pooled 16 KiB chunks,
// only until they are read, at most its receive window.
type h2conn struct {
	srv        *Server // nil on the client side
	t          Tuning
	log        *slog.Logger
	nc         net.Conn
	info       *Conn
	rd         frameReader // the read loop's
	wfr        *http2.Framer
	ctx        context.Context // server: the handlers' parent
	cancel     context.CancelFunc
	wg         sync.WaitGroup // server: handlers
	idle       *time.Timer    // server: closes the connection when no stream is left
	life       *time.Timer    // server: ends the connection's life (Conn.Expires)
	writerDone chan struct{}
	done       chan struct{} // closed once the connection ended (teardown)

	// Read loop only.
	resets bucket // premature resets (ErrRapidReset)
	flood  bucket // frames without work (ErrFrameFlood)

	// Writer only.
	fw        frameWriter
	henc      *hpack.Encoder
	hbuf      bytes.Buffer
	hdr       [9]byte
	wMaxFrame int // the peer's frame size when the header block was queued

	framesRead atomic.Uint64 // the client's keepalive watches it

	mu             sync.Mutex
	wcond          sync.Cond // the writer: work queued, or closing
	ctl            ring[ctlFrame]
	ready          ring[*Stream] // streams with data or END_STREAM to send
	peerCtl        int           // queued answers to the peer
	connWU         int64         // connection WINDOW_UPDATE to send
	connWUQueued   bool
	hencLimit      uint32 // SETTINGS_HEADER_TABLE_SIZE to apply (hencLimitSet)
	hencLimitSet   bool
	werr           error // the writer failed: the connection is dead
	wclosing       bool  // the writer closes the connection once idle
	wbusy          bool  // the writer or a stream's user (directLocked) writes
	streams        map[uint32]*Stream
	streamsPeak    shrink.Peak // of streams, so that it gives back a burst's memory
	lastStreamID   uint32      // server: the client's highest stream ID
	connSendWindow int64
	peerInitWindow int64
	peerMaxFrame   int
	connRecvWindow int64 // what the peer may still send on the connection
	connUnacked    int64 // consumed, not yet granted back
	closed         bool
	goingAway      bool // we sent GOAWAY

	// Server only, guarded by mu.
	running int // handlers not returned: what MaxConcurrentStreams counts
	drain   *time.Timer

	// Client only, guarded by mu.
	cl clientState
}

// newConn returns a connection on nc with its windows at HTTP/2's
// initial values; the caller sets the role's fields and starts it.
func newConn(t Tuning, log *slog.Logger, nc net.Conn, info *Conn) *h2conn {
	hc := &h2conn{
		t:              t,
		log:            log,
		nc:             nc,
		info:           info,
		fw:             frameWriter{w: nc},
		streams:        make(map[uint32]*Stream),
		streamsPeak:    shrink.Peak{Min: streamsShrinkFrom},
		connSendWindow: 65535,
		peerInitWindow: 65535,
		peerMaxFrame:   16384,
		connRecvWindow: int64(t.ConnWindow),
		writerDone:     make(chan struct{}),
		done:           make(chan struct{}),
	}
	if tc, ok := nc.(*tls.Conn); ok {
		hc.fw.b, _ = tc.NetConn().(*batchConn)
	}
	hc.rd.init(nc, t)
	hc.wfr = http2.NewFramer(&hc.fw, nil)
	hc.wcond.L = &hc.mu
	hc.henc = hpack.NewEncoder(&hc.hbuf)
	return hc
}

// readLoop reads and handles frames until the connection ends, then
// tears it down.
func (hc *h2conn) readLoop() {
	defer hc.teardown()
	for {
		fh, err := hc.rd.readHeader()
		if err != nil {
			hc.readError(err)
			return
		}
		hc.framesRead.Add(1)
		if fh.Type == http2.FrameData {
			if !hc.readData(fh) {
				return
			}
			continue
		}
		f, err := hc.rd.readFrame(fh)
		if err != nil {
			if !hc.readError(err) {
				return
			}
			continue
		}
		if !hc.processFrame(f) {
			return
		}
	}
}

// readError handles an error of reading a frame; false ends the
// connection.
func (hc *h2conn) readError(err error) bool {
	var se http2.StreamError
	if errors.As(err, &se) {
		if hc.srv != nil {
			return hc.serverStreamError(se)
		}
		hc.mu.Lock()
		st := hc.streams[se.StreamID]
		hc.mu.Unlock()
		if st != nil {
			st.abort(se.Code, ErrStreamClosed)
			return true
		}
		return hc.queuePeer(ctlFrame{kind: ctlRST, id: se.StreamID, code: se.Code})
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		hc.log.Debug("hbone: connection error", "remote", hc.info.Remote, "code", http2.ErrCode(ce))
		hc.goAway(http2.ErrCode(ce))
		if hc.srv != nil && hc.srv.Refused != nil {
			detail := ""
			if http2.ErrCode(ce) == http2.ErrCodeCompression {
				detail = " (undecodable header block, or one field beyond the header limit)"
			}
			hc.srv.Refused(hc.info, fmt.Errorf("hbone: %w: connection error %v%s", ErrMalformed, http2.ErrCode(ce), detail))
		}
	}
	return false
}

func (hc *h2conn) connError(code http2.ErrCode) bool {
	return hc.readError(http2.ConnectionError(code))
}

// calm ends the connection of an abusive peer: GOAWAY with
// ENHANCE_YOUR_CALM, Refused (on the server), and false for the read
// loop, which then closes the connection once the GOAWAY is written (at
// most flushTimeout).
func (hc *h2conn) calm(sentinel error, detail string) bool {
	err := fmt.Errorf("hbone: %w: %s from %s (%s)", sentinel, hc.info.PeerID, hc.info.Remote, detail)
	hc.log.Debug("hbone: closing abusive connection", "remote", hc.info.Remote, "peer", hc.info.PeerID, "error", err)
	hc.goAway(http2.ErrCodeEnhanceYourCalm)
	if hc.srv != nil && hc.srv.Refused != nil {
		hc.srv.Refused(hc.info, err)
	}
	return false
}

// noWork charges one frame that makes no tunnel work against the flood
// budget; false ends the connection.
func (hc *h2conn) noWork(what string) bool {
	if hc.flood.take(time.Now(), hc.t.FloodRate, hc.t.FloodBurst) {
		return true
	}
	return hc.calm(ErrFrameFlood, fmt.Sprintf("%s beyond %d at %g/s", what, hc.t.FloodBurst, hc.t.FloodRate))
}

// queuePeer queues an answer to the peer; false (and the connection
// closed as a flood) when too many answers wait for a peer that does not
// read them.
func (hc *h2conn) queuePeer(f ctlFrame) bool {
	hc.mu.Lock()
	if hc.peerCtl >= maxPeerCtl {
		hc.mu.Unlock()
		return hc.calm(ErrFrameFlood, fmt.Sprintf("%d answers unread", maxPeerCtl))
	}
	f.peer = true
	hc.peerCtl++
	hc.queueCtlLocked(f)
	hc.mu.Unlock()
	return true
}

// processFrame handles one frame other than DATA; false ends the
// connection.
func (hc *h2conn) processFrame(f http2.Frame) bool {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return true
		}
		if !hc.noWork("SETTINGS") {
			return false
		}
		hc.mu.Lock()
		err := f.ForeachSetting(func(s http2.Setting) error {
			if err := s.Valid(); err != nil {
				return err
			}
			switch s.ID {
			case http2.SettingInitialWindowSize:
				hc.initialWindowLocked(int64(s.Val))
			case http2.SettingMaxFrameSize:
				hc.peerMaxFrame = int(s.Val)
			case http2.SettingHeaderTableSize:
				hc.hencLimit, hc.hencLimitSet = s.Val, true
			case http2.SettingMaxConcurrentStreams:
				hc.cl.peerMaxStreams = s.Val
			}
			return nil
		})
		hc.mu.Unlock()
		if err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return hc.connError(http2.ErrCode(ce))
			}
			return hc.connError(http2.ErrCodeProtocol)
		}
		return hc.queuePeer(ctlFrame{kind: ctlSettingsAck})
	case *http2.MetaHeadersFrame:
		if hc.srv != nil {
			return hc.processRequest(f)
		}
		return hc.processResponse(f)
	case *http2.WindowUpdateFrame:
		return hc.processWindowUpdate(f)
	case *http2.RSTStreamFrame:
		if hc.srv != nil {
			return hc.processClientReset(f)
		}
		return hc.processServerReset(f)
	case *http2.PingFrame:
		if f.IsAck() {
			hc.mu.Lock()
			hc.cl.pingOut = false
			hc.mu.Unlock()
			return true
		}
		if !hc.noWork("PING") {
			return false
		}
		return hc.queuePeer(ctlFrame{kind: ctlPingAck, data: f.Data})
	case *http2.GoAwayFrame:
		hc.log.Debug("hbone: peer sent GOAWAY", "remote", hc.info.Remote, "code", f.ErrCode)
		if hc.srv == nil {
			hc.processGoAway(f)
		}
	case *http2.PushPromiseFrame:
		return hc.connError(http2.ErrCodeProtocol)
	default: // PRIORITY, unknown extension frames
		return hc.noWork("frame " + f.Header().Type.String())
	}
	return true
}

// goAway sends GOAWAY with code and closes the connection once no stream
// is left; for NO_ERROR the open streams get Tuning.DrainTimeout.
func (hc *h2conn) goAway(code http2.ErrCode) {
	hc.mu.Lock()
	hc.goAwayLocked(code)
	hc.mu.Unlock()
}

func (hc *h2conn) goAwayLocked(code http2.ErrCode) {
	// A graceful GOAWAY is sent once; an error may follow it.
	if hc.closed || hc.goingAway && code == http2.ErrCodeNo {
		return
	}
	again := hc.goingAway
	hc.goingAway = true
	hc.queueCtlLocked(ctlFrame{kind: ctlGoAway, id: hc.lastStreamID, code: code})
	if hc.srv == nil || hc.running == 0 {
		hc.closeWhenFlushedLocked()
		return
	}
	if code == http2.ErrCodeNo && !again {
		hc.drain = time.AfterFunc(hc.t.DrainTimeout, func() {
			hc.log.Debug("hbone: drain timeout, closing the connection", "remote", hc.info.Remote)
			hc.closeConn()
		})
	}
}

// closeWhenFlushedLocked makes the writer close the connection once it
// has written what is queued.
func (hc *h2conn) closeWhenFlushedLocked() {
	hc.wclosing = true
	hc.wcond.Signal()
}

// closeConn closes the connection at once. Under a batchConn the TCP
// connection closes first: a TLS close would send its close_notify
// after the batch being flushed, waiting for the network.
func (hc *h2conn) closeConn() {
	if hc.fw.b != nil {
		hc.fw.b.Conn.Close()
	}
	hc.nc.Close()
}

// errConnClosed is what the streams of a connection that ended fail
// with.
var errConnClosed = fmt.Errorf("%w: connection closed", ErrStreamClosed)

// teardown ends the connection once its read loop ended: every stream
// fails, the writer gets flushTimeout to send what is queued, and the
// server waits for its handlers.
func (hc *h2conn) teardown() {
	if hc.idle != nil {
		hc.idle.Stop()
	}
	if hc.life != nil {
		hc.life.Stop()
	}
	hc.mu.Lock()
	if hc.drain != nil {
		hc.drain.Stop()
	}
	if hc.cl.keepalive != nil {
		hc.cl.keepalive.Stop()
	}
	hc.closed = true
	var pushing []*Stream
	for _, st := range hc.streams {
		if st.err == nil {
			st.err = errConnClosed
		}
		st.q.reset()
		st.cond.Broadcast()
		if st.ctx != nil {
			st.ctx.Cancel(st.err)
		}
		if st.pushStepLocked() == pushEnd {
			pushing = append(pushing, st)
		}
	}
	hc.closeWhenFlushedLocked()
	hc.mu.Unlock()
	for _, st := range pushing {
		st.pushRun(pushEnd, false)
	}
	// Let the writer send what is queued (a GOAWAY), briefly.
	t := time.AfterFunc(flushTimeout, hc.closeConn)
	<-hc.writerDone
	t.Stop()
	hc.closeConn()
	if hc.cancel != nil {
		hc.cancel()
	}
	hc.wg.Wait()
	close(hc.done)
}

// frameReader reads frames from the connection without a buffer of its
// own: the 9-byte header first, then a DATA frame's payload straight into
// its stream's chunks (readData), or any other frame through an
// http2.Framer that is handed the header again.
type frameReader struct {
	r      io.Reader
	hdr    [9]byte
	replay int // bytes of hdr the framer has not read yet
	fr     *http2.Framer
	dec    *hpack.Decoder
	t      Tuning
	small  [512]byte // small DATA payloads and discarded bytes
}

// maxKeptFrame is the largest frame whose buffer the framer keeps for the
// next one; after a larger frame (a big header block, an unknown frame)
// the framer is replaced, so that its buffer does not stay at the size
// of the largest frame the peer ever sent.
const maxKeptFrame = 16 << 10

func (x *frameReader) init(r io.Reader, t Tuning) {
	x.r, x.t = r, t
	x.dec = hpack.NewDecoder(4096, nil)
	x.newFramer()
}

func (x *frameReader) newFramer() {
	x.fr = http2.NewFramer(nil, x)
	x.fr.ReadMetaHeaders = x.dec // the HPACK state outlives the framer
	x.fr.MaxHeaderListSize = x.t.MaxHeaderListSize
	x.fr.SetMaxReadFrameSize(x.t.MaxFrameSize)
	x.fr.SetReuseFrames()
}

// Read gives the framer the header read ahead, then the connection.
func (x *frameReader) Read(p []byte) (int, error) {
	if x.replay > 0 {
		n := copy(p, x.hdr[len(x.hdr)-x.replay:])
		x.replay -= n
		return n, nil
	}
	return x.r.Read(p)
}

// readHeader reads the next frame's header.
func (x *frameReader) readHeader() (http2.FrameHeader, error) {
	if _, err := io.ReadFull(x.r, x.hdr[:]); err != nil {
		return http2.FrameHeader{}, err
	}
	h := x.hdr
	return http2.FrameHeader{
		Length:   uint32(h[0])<<16 | uint32(h[1])<<8 | uint32(h[2]),
		Type:     http2.FrameType(h[3]),
		Flags:    http2.Flags(h[4]),
		StreamID: (uint32(h[5])<<24 | uint32(h[6])<<16 | uint32(h[7])<<8 | uint32(h[8])) & (1<<31 - 1),
	}, nil
}

// readFrame reads the frame whose header readHeader returned, through the
// framer (a header block with its CONTINUATION frames).
func (x *frameReader) readFrame(fh http2.FrameHeader) (http2.Frame, error) {
	x.replay = len(x.hdr)
	f, err := x.fr.ReadFrame()
	if fh.Length > maxKeptFrame {
		// f stays valid: it keeps the old framer's buffer alive until it
		// has been handled.
		x.newFramer()
	}
	return f, err
}

// discard reads and drops n bytes.
func (x *frameReader) discard(n int) error {
	for n > 0 {
		k := min(n, len(x.small))
		if _, err := io.ReadFull(x.r, x.small[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
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
