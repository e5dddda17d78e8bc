package hbone_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// A raw HTTP/2 client on the frame level, for tests that need a client
// that misbehaves (resets streams in a loop, floods, does not read) or
// keeps a connection past its certificate's expiry, which the pool
// would not do.

// pipeAddrs gives a net.Pipe end the TCP addresses the server needs (it
// chooses its certificate by the local address).
type pipeAddrs struct {
	net.Conn
	local, remote net.Addr
}

func (c pipeAddrs) LocalAddr() net.Addr  { return c.local }
func (c pipeAddrs) RemoteAddr() net.Addr { return c.remote }

var (
	rawServerAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 9, 1), Port: 15008}
	rawClientAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 9, 2), Port: 40000}
	rawTarget     = "127.0.9.1:8080"
)

// rawEnv is a Server with a CA, reached over net.Pipe (no buffering at
// all: a write waits until the other side reads it) or over loopback TCP.
type rawEnv struct {
	t       *testing.T
	ca      *ztest.CA
	srv     *hbone.Server
	client  spiffeid.ID
	server  spiffeid.ID
	mu      sync.Mutex
	refused []error
	wg      sync.WaitGroup
	ctx     context.Context
}

func newRawEnv(t *testing.T, tune hbone.Tuning, handler func(ctx context.Context, s *hbone.Stream)) *rawEnv {
	t.Helper()
	e := &rawEnv{t: t, ca: ztest.NewCA(t, "cluster.local", ca.Options{})}
	e.client = e.ca.ID("shop", "frontend")
	e.server = e.ca.ID("shop", "checkout")
	e.srv = &hbone.Server{
		Tuning:  tune,
		Handler: handler,
		Refused: func(_ *hbone.Conn, err error) {
			e.mu.Lock()
			e.refused = append(e.refused, err)
			e.mu.Unlock()
		},
		LocalSVID: func(ctx context.Context, _ netip.Addr) (*x509svid.SVID, error) { return e.ca.SVID(ctx, e.server) },
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.ctx = ctx
	t.Cleanup(func() {
		e.srv.Close()
		cancel()
		e.wg.Wait()
	})
	return e
}

// refusals returns the errors Refused received so far.
func (e *rawEnv) refusals() []error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]error(nil), e.refused...)
}

// serve runs the server's handshake and ServeConn on c in the background.
func (e *rawEnv) serve(c net.Conn) {
	cfg := hbone.ServerConfig(func(ctx context.Context, _ netip.Addr) (*x509svid.SVID, error) {
		return e.ca.SVID(ctx, e.server)
	}, e.ca.Bundles())
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		tc := tls.Server(c, cfg)
		hctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			c.Close()
			return
		}
		e.srv.ServeConn(e.ctx, tc)
	}()
}

// pipe connects a raw client to the server over net.Pipe.
func (e *rawEnv) pipe(svid *x509svid.SVID, pauseOn func(frameSummary) bool) *rawClient {
	e.t.Helper()
	cc, sc := net.Pipe()
	e.serve(pipeAddrs{sc, rawServerAddr, rawClientAddr})
	return e.dialOn(pipeAddrs{cc, rawClientAddr, rawServerAddr}, svid, pauseOn)
}

// tcp connects a raw client to the server over loopback TCP.
func (e *rawEnv) tcp(svid *x509svid.SVID) *rawClient {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		e.t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		e.t.Fatal(err)
	}
	e.serve(s)
	return e.dialOn(c, svid, nil)
}

// rawClient speaks HTTP/2 frame by frame. It announces large windows so
// that the server never waits for its WINDOW_UPDATEs, never acknowledges
// SETTINGS (the server does not wait for that), and reads in a goroutine
// that hands frames to the test through a channel and can be paused.
type rawClient struct {
	t      *testing.T
	c      net.Conn
	wmu    sync.Mutex // writes
	fr     *http2.Framer
	enc    *hpack.Encoder
	hbuf   bytes.Buffer
	frames chan frameSummary // closed when reading fails
	mu     sync.Mutex
	rerr   error
	// pauseOn, if set before the first read, pauses the reader after the
	// first frame it matches, until resume.
	pauseOn func(frameSummary) bool
	resumed chan struct{}
	once    sync.Once
}

func (e *rawEnv) dialOn(c net.Conn, svid *x509svid.SVID, pauseOn func(frameSummary) bool) *rawClient {
	e.t.Helper()
	if svid == nil {
		var err error
		if svid, err = e.ca.SVID(context.Background(), e.client); err != nil {
			e.t.Fatal(err)
		}
	}
	tc := tls.Client(c, hbone.ClientConfig(svid, e.ca.Bundles(), e.server))
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if err := tc.Handshake(); err != nil {
		e.t.Fatalf("handshake: %v", err)
	}
	_ = c.SetDeadline(time.Time{})
	rc := &rawClient{t: e.t, c: tc, fr: http2.NewFramer(tc, tc), frames: make(chan frameSummary, 1<<14),
		pauseOn: pauseOn, resumed: make(chan struct{})}
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	done := make(chan struct{})
	e.t.Cleanup(func() {
		rc.resume()
		tc.Close()
		<-done
	})
	go func() {
		defer close(done)
		rc.readLoop()
	}()
	err := rc.write(func(fr *http2.Framer) error {
		if _, err := tc.Write([]byte(http2.ClientPreface)); err != nil {
			return err
		}
		if err := fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}); err != nil {
			return err
		}
		return fr.WriteWindowUpdate(0, 1<<30)
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return rc
}

func (rc *rawClient) readLoop() {
	defer close(rc.frames)
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			rc.mu.Lock()
			rc.rerr = err
			rc.mu.Unlock()
			return
		}
		s := frameSummary{typ: f.Header().Type, id: f.Header().StreamID}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			s.status, s.end = f.PseudoValue("status"), f.StreamEnded()
		case *http2.DataFrame:
			s.n, s.end = len(f.Data()), f.StreamEnded()
		case *http2.RSTStreamFrame:
			s.code = f.ErrCode
		case *http2.GoAwayFrame:
			s.code, s.id = f.ErrCode, f.LastStreamID
		case *http2.PingFrame:
			s.end = f.IsAck()
		}
		rc.frames <- s
		if rc.pauseOn != nil && rc.pauseOn(s) {
			rc.pauseOn = nil
			<-rc.resumed
		}
	}
}

// resume lets a paused reader go on.
func (rc *rawClient) resume() { rc.once.Do(func() { close(rc.resumed) }) }

// write runs w with the write lock held and a write deadline of 10 s.
func (rc *rawClient) write(w func(fr *http2.Framer) error) error {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	_ = rc.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return w(rc.fr)
}

// connect sends a CONNECT for stream id.
func (rc *rawClient) connect(id uint32, end bool) error {
	return rc.write(func(fr *http2.Framer) error {
		rc.hbuf.Reset()
		for _, f := range []hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":authority", Value: rawTarget}} {
			_ = rc.enc.WriteField(f)
		}
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.hbuf.Bytes(), EndHeaders: true, EndStream: end})
	})
}

// reset sends RST_STREAM(CANCEL) for stream id.
func (rc *rawClient) reset(id uint32) error {
	return rc.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeCancel) })
}

// frameSummary is what the tests look at in a frame read.
type frameSummary struct {
	typ    http2.FrameType
	id     uint32 // stream; for GOAWAY the last stream ID
	status string
	code   http2.ErrCode
	end    bool // END_STREAM; for PING the ACK flag
	n      int  // DATA length
}

// next returns the next frame, or an error once the connection ended or
// nothing came within d.
func (rc *rawClient) next(d time.Duration) (frameSummary, error) {
	select {
	case s, ok := <-rc.frames:
		if !ok {
			rc.mu.Lock()
			defer rc.mu.Unlock()
			return s, fmt.Errorf("connection ended: %w", rc.rerr)
		}
		return s, nil
	case <-time.After(d):
		return frameSummary{}, fmt.Errorf("no frame within %v", d)
	}
}

// readUntil reads frames until match returns true, for at most 20 s.
func (rc *rawClient) readUntil(what string, match func(frameSummary) bool) (frameSummary, error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		s, err := rc.next(time.Until(deadline))
		if err != nil {
			return s, fmt.Errorf("waiting for %s: %w", what, err)
		}
		if match(s) {
			return s, nil
		}
	}
}

// status waits for the response HEADERS (or RST_STREAM) of stream id.
func (rc *rawClient) status(id uint32) (string, error) {
	s, err := rc.readUntil(fmt.Sprintf("the answer to stream %d", id), func(s frameSummary) bool {
		return s.id == id && (s.typ == http2.FrameHeaders || s.typ == http2.FrameRSTStream)
	})
	if err != nil {
		return "", err
	}
	if s.typ == http2.FrameRSTStream {
		return "RST_STREAM " + s.code.String(), nil
	}
	return s.status, nil
}

// waitClosed reads until the connection ends (at most 20 s) and returns
// the last GOAWAY seen on the way, if any.
func (rc *rawClient) waitClosed() (*frameSummary, error) {
	var goAway *frameSummary
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case s, ok := <-rc.frames:
			if !ok {
				return goAway, nil
			}
			if s.typ == http2.FrameGoAway {
				goAway = &s
			}
		case <-time.After(time.Until(deadline)):
			return goAway, errors.New("the connection is still open after 20 s")
		}
	}
}
