package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/shrink"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
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
	// Write; the stream is closed when Handler returns, unless Handler
	// detached it (Stream.Detach), and then when the detached stream's
	// done is called. Its context ends when the client resets the stream
	// or the connection closes. The stream counts against
	// Tuning.MaxConcurrentStreams until then, whatever the client does.
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
	conns    map[*h2conn]struct{}
	peak     shrink.Peak // of conns, so that it gives back a burst's memory
	shutdown bool
}

// flushTimeout bounds how long a closing connection waits for its last
// frames (a GOAWAY) to be written.
const flushTimeout = time.Second

// maxPeerCtl bounds the frames queued in answer to the client (acks,
// refusals) while it does not read them; beyond it the connection is
// closed as a flood.
const maxPeerCtl = 1024

// ServeConn serves HBONE on tc, which must have completed its handshake
// with a configuration from ServerConfig. It returns when the connection
// is closed, after every handler on it returned (and every detached
// stream's done was called). Cancelling ctx closes the
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
	var pre [len(http2.ClientPreface)]byte
	_ = tc.SetReadDeadline(time.Now().Add(t.HandshakeTimeout))
	n, err := io.ReadFull(tc, pre[:])
	if err != nil || string(pre[:]) != http2.ClientPreface {
		if err == nil || n > 0 {
			s.refuseHTTP1(tc, info)
		}
		return
	}
	_ = tc.SetReadDeadline(time.Time{})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hc := newConn(t, log, tc, info)
	hc.srv = s
	hc.ctx, hc.cancel = ctx, cancel

	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		return
	}
	if s.conns == nil {
		s.conns = make(map[*h2conn]struct{})
	}
	s.conns[hc] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		shrink.Delete(&s.conns, hc, &s.peak)
		s.mu.Unlock()
	}()

	hc.idle = time.AfterFunc(t.IdleTimeout, hc.onIdle)
	hc.life = time.AfterFunc(time.Until(info.Expires), hc.onExpired)
	stop := context.AfterFunc(ctx, func() { tc.Close() })
	defer stop()
	hc.mu.Lock()
	hc.queueCtlLocked(ctlFrame{kind: ctlSettings})
	if !time.Now().Before(info.Expires) {
		hc.goAwayLocked(http2.ErrCodeNo)
	}
	hc.mu.Unlock()
	go hc.writeLoop()
	hc.readLoop()
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
	conns := make([]*h2conn, 0, len(s.conns))
	for hc := range s.conns {
		conns = append(conns, hc)
	}
	s.mu.Unlock()
	for _, hc := range conns {
		hc.goAway(http2.ErrCodeNo)
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

// Conns returns how many connections the server is serving.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Close closes every connection at once.
func (s *Server) Close() {
	s.mu.Lock()
	s.shutdown = true
	for hc := range s.conns {
		hc.closeConn()
	}
	s.mu.Unlock()
}
