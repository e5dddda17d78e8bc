package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Key identifies a pool of connections: streams are multiplexed only
// between the same source identity, destination identity and destination
// pod IP.
type Key struct {
	Src, Dst spiffeid.ID
	DstIP    netip.Addr
}

// String formats the key for logs.
func (k Key) String() string { return k.Src.String() + "->" + k.Dst.String() + "@" + k.DstIP.String() }

// DialFunc opens the TCP connection under an HBONE connection. src is the
// address to bind (zero: any).
type DialFunc func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)

// PoolConfig configures a Pool.
type PoolConfig struct {
	// Tuning sets windows, stream and connection limits, keepalives and
	// idle close; zero fields take defaults.
	Tuning Tuning
	// SVID returns the SVID of a local source identity.
	SVID func(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
	// Bundles verifies servers.
	Bundles x509bundle.Source
	// Dial opens TCP connections (marks, transparent binding); nil uses a
	// plain net.Dialer.
	Dial DialFunc
	// Logger receives debug events; nil discards them.
	Logger *slog.Logger
}

// Pool multiplexes CONNECT streams over shared mutual-TLS HTTP/2
// connections.
type Pool struct {
	cfg   PoolConfig
	t     Tuning
	log   *slog.Logger
	tr    *http.Transport
	mu    sync.Mutex
	keys  map[Key]*keyConns
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
	stats struct{ handshakes, streams atomic.Uint64 }
}

type keyConns struct {
	conns   []*poolConn
	dialing *dialAttempt
}

type dialAttempt struct {
	done chan struct{}
	err  error
}

type poolConn struct {
	cc       *http.ClientConn
	inflight int // guarded by Pool.mu
	idleAt   time.Time
	// retireAt is when the pool stops putting streams on the connection:
	// a margin before its end of life (see retireTime).
	retireAt time.Time
}

// retireTime returns when a connection dialled at now, whose life ends at
// end (the earlier certificate expiry of both ends, or the maximum age),
// stops taking new streams: a quarter of its life, at most
// maxRetireMargin, before the end. The server refuses new streams from
// the end on; the margin covers the request in flight and clock skew.
func retireTime(now, end time.Time) time.Time {
	return end.Add(-min(end.Sub(now)/4, maxRetireMargin))
}

// maxRetireMargin bounds how long before its end a connection is retired.
const maxRetireMargin = time.Minute

// retired reports whether c takes no new streams at now.
func (c *poolConn) retired(now time.Time) bool { return !now.Before(c.retireAt) }

type dialKey struct{}

type dialParams struct {
	key  Key
	addr netip.AddrPort
	src  netip.Addr
	// notAfter is set by dialTLS: the earlier expiry of the two leaf
	// certificates of the handshake.
	notAfter time.Time
}

// NewPool returns a pool; Close it to stop its reaper and close its
// connections.
func NewPool(cfg PoolConfig) *Pool {
	p := &Pool{
		cfg:  cfg,
		t:    cfg.Tuning.WithDefaults(),
		log:  cfg.Logger,
		keys: make(map[Key]*keyConns),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.cfg.Dial == nil {
		p.cfg.Dial = func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			d := net.Dialer{}
			if src.IsValid() {
				d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
			}
			return d.DialContext(ctx, "tcp", dst.String())
		}
	}
	protos := new(http.Protocols)
	protos.SetHTTP2(true)
	p.tr = &http.Transport{
		Protocols:         protos,
		DialTLSContext:    p.dialTLS,
		ForceAttemptHTTP2: true,
		HTTP2: &http.HTTP2Config{
			MaxReceiveBufferPerConnection: int(p.t.ConnWindow),
			MaxReceiveBufferPerStream:     int(p.t.StreamWindow),
			MaxReadFrameSize:              int(p.t.MaxFrameSize),
			SendPingTimeout:               p.t.KeepaliveInterval,
			PingTimeout:                   p.t.KeepaliveTimeout,
		},
		DisableCompression: true,
	}
	go p.reap()
	return p
}

// Stats counts TLS handshakes made and streams opened.
type Stats struct{ Handshakes, Streams uint64 }

// Stats returns the pool's counters.
func (p *Pool) Stats() Stats {
	return Stats{Handshakes: p.stats.handshakes.Load(), Streams: p.stats.streams.Load()}
}

// Conns returns how many connections the pool holds.
func (p *Pool) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, k := range p.keys {
		n += len(k.conns)
	}
	return n
}

// Close closes every pooled connection (interrupting their streams) and
// stops the idle reaper.
func (p *Pool) Close() {
	p.once.Do(func() { close(p.stop) })
	<-p.done
	p.mu.Lock()
	var all []*poolConn
	for k, kc := range p.keys {
		all = append(all, kc.conns...)
		delete(p.keys, k)
	}
	p.mu.Unlock()
	for _, c := range all {
		c.cc.Close()
	}
}

func (p *Pool) reap() {
	defer close(p.done)
	tick := time.NewTicker(max(p.t.IdleTimeout/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-tick.C:
			var dead []*poolConn
			p.mu.Lock()
			for k, kc := range p.keys {
				live := kc.conns[:0]
				for _, c := range kc.conns {
					if c.cc.Err() != nil || c.inflight == 0 && (now.Sub(c.idleAt) >= p.t.IdleTimeout || c.retired(now)) {
						dead = append(dead, c)
						continue
					}
					live = append(live, c)
				}
				clear(kc.conns[len(live):])
				kc.conns = live
				if len(kc.conns) == 0 && kc.dialing == nil {
					delete(p.keys, k)
				}
			}
			p.mu.Unlock()
			for _, c := range dead {
				p.log.Debug("hbone: closing idle connection")
				c.cc.Close()
			}
		}
	}
}

// Errors of Connect, besides TLS verification errors (ErrPeerMismatch and
// friends) and dial errors.
var (
	// ErrRefused: the server answered something other than 200; the
	// error is a *RefusedError.
	ErrRefused = errors.New("CONNECT refused")
	// ErrPoolClosed: the pool was closed.
	ErrPoolClosed = errors.New("hbone: pool closed")
)

// RefusedError carries the status of a refused CONNECT.
type RefusedError struct{ Status int }

func (e *RefusedError) Error() string {
	return fmt.Sprintf("hbone: CONNECT refused with %d %s", e.Status, http.StatusText(e.Status))
}

// Unwrap makes errors.Is(err, ErrRefused) true.
func (e *RefusedError) Unwrap() error { return ErrRefused }

// Request is one CONNECT.
type Request struct {
	// Key selects the pooled connection.
	Key Key
	// Addr is where to dial the HBONE server (normally DstIP:15008).
	Addr netip.AddrPort
	// BindSrc, if valid, is the local address for new connections (the
	// client pod's IP with transparent sockets).
	BindSrc netip.Addr
	// Target is the CONNECT :authority, the destination pod's ip:port.
	Target netip.AddrPort
	// Forwarded, if valid, is sent as Forwarded: for="ip:port".
	Forwarded netip.AddrPort
	// Header holds extra request headers.
	Header http.Header
	// Body is what the tunnel sends: it is read until EOF, which
	// half-closes the stream. Body is never closed by the pool.
	Body io.Reader
}

// ClientStream is an open tunnel: Read returns what the server sends (EOF
// when it half-closed); what Request.Body yields is sent concurrently.
type ClientStream struct {
	resp *http.Response
	body *bodyReader
	pool *Pool
	pc   *poolConn
	once sync.Once
}

// Read reads from the tunnel.
func (cs *ClientStream) Read(p []byte) (int, error) { return cs.resp.Body.Read(p) }

// SendDone is closed once the request body is finished: EOF sent, or the
// stream aborted.
func (cs *ClientStream) SendDone() <-chan struct{} { return cs.body.done }

// Sent returns the bytes read from Request.Body so far.
func (cs *ClientStream) Sent() int64 { return cs.body.n.Load() }

// Close ends the stream (resetting it if either direction is still open)
// and returns its slot to the pool.
func (cs *ClientStream) Close() error {
	cs.once.Do(func() {
		cs.resp.Body.Close()
		cs.pool.release(cs.pc)
	})
	return nil
}

// bodyReader feeds the request body from the caller's reader and notes
// when it ends: when the transport closes it, after it sent the last byte
// and END_STREAM, or aborted the stream. The EOF of the caller's reader is
// not the end: the transport may still hold bytes it read but could not
// send yet (flow control), and closing the stream then would drop them.
type bodyReader struct {
	r    io.Reader
	n    atomic.Int64
	once sync.Once
	done chan struct{}
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// Close is called by the transport when it is done with the body, also
// concurrently with a Read when the stream is aborted (the connection to
// the server died): a Read blocked on a reader with read deadlines (a
// net.Conn) is then woken up, so the stream's end reaches the caller
// instead of waiting for the client's next byte. The reader itself stays
// open.
func (b *bodyReader) Close() error {
	if d, ok := b.r.(interface{ SetReadDeadline(time.Time) error }); ok {
		_ = d.SetReadDeadline(time.Unix(1, 0))
	}
	b.finish()
	return nil
}

func (b *bodyReader) finish() { b.once.Do(func() { close(b.done) }) }

// Connect opens a CONNECT stream to req.Target over a pooled connection
// for req.Key, dialing (and handshaking) a new connection when none has a
// free stream slot. Errors wrap ErrRefused (with a *RefusedError),
// ErrStreamLimit, the TLS verification errors of this package, or the
// dial error.
func (p *Pool) Connect(ctx context.Context, req *Request) (*ClientStream, error) {
	pc, err := p.get(ctx, req)
	if err != nil {
		return nil, err
	}
	body := &bodyReader{r: req.Body, done: make(chan struct{})}
	hdr := make(http.Header, len(req.Header)+1)
	for k, v := range req.Header {
		hdr[k] = v
	}
	if req.Forwarded.IsValid() {
		hdr.Set("Forwarded", FormatForwarded(req.Forwarded))
	}
	target := req.Target.String()
	hreq := (&http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: target},
		Host:          target,
		Header:        hdr,
		Body:          body,
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}).WithContext(ctx)
	resp, err := pc.cc.RoundTrip(hreq)
	if err != nil {
		body.finish()
		p.release(pc)
		return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", target, req.Addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		body.finish()
		p.release(pc)
		return nil, &RefusedError{Status: resp.StatusCode}
	}
	p.stats.streams.Add(1)
	return &ClientStream{resp: resp, body: body, pool: p, pc: pc}, nil
}

// get reserves a stream slot on a connection for req.Key.
func (p *Pool) get(ctx context.Context, req *Request) (*poolConn, error) {
	for {
		select {
		case <-p.stop:
			return nil, ErrPoolClosed
		default:
		}
		p.mu.Lock()
		kc := p.keys[req.Key]
		if kc == nil {
			kc = &keyConns{}
			p.keys[req.Key] = kc
		}
		now := time.Now()
		usable := 0
		for _, c := range kc.conns {
			if c.retired(now) {
				continue // draining: closed once its streams are done
			}
			usable++
			if c.inflight < p.t.MaxStreamsPerConn && c.cc.Reserve() == nil {
				c.inflight++
				p.mu.Unlock()
				return c, nil
			}
		}
		if a := kc.dialing; a != nil {
			p.mu.Unlock()
			select {
			case <-a.done:
				if a.err != nil {
					return nil, a.err
				}
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("hbone: waiting for a connection to %s: %w", req.Addr, ctx.Err())
			}
		}
		if usable >= p.t.MaxConnsPerKey {
			p.mu.Unlock()
			return nil, fmt.Errorf("hbone: %w: %d connections of %d streams to %s are busy",
				ErrStreamLimit, usable, p.t.MaxStreamsPerConn, req.Key)
		}
		a := &dialAttempt{done: make(chan struct{})}
		kc.dialing = a
		p.mu.Unlock()

		pc, err := p.dial(ctx, req)
		p.mu.Lock()
		kc.dialing = nil
		if err != nil {
			a.err = err
		} else {
			kc.conns = append(kc.conns, pc)
		}
		close(a.done)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		// The dialler gets a stream on its connection even if it is
		// already retired (a certificate about to expire): the server
		// decides then.
		if pc.cc.Reserve() == nil {
			pc.inflight++
			p.mu.Unlock()
			return pc, nil
		}
		p.mu.Unlock()
	}
}

func (p *Pool) release(pc *poolConn) {
	p.mu.Lock()
	pc.inflight--
	now := time.Now()
	done := pc.inflight == 0 && pc.retired(now)
	if pc.inflight == 0 {
		pc.idleAt = now
	}
	p.mu.Unlock()
	if done {
		// Retired and drained: close it now rather than at the reaper's
		// next round (which then forgets it).
		p.log.Debug("hbone: closing a retired connection", "retired_at", pc.retireAt)
		pc.cc.Close()
	}
}

// dial opens a new connection. The dial is not bound to the caller's
// context beyond the handshake timeout: the connection is shared. The
// connection retires ahead of the earlier expiry of the two certificates
// and of Tuning.MaxConnectionAge; a later dial presents the SVID current
// then, so certificate rotation needs no stream to fail.
func (p *Pool) dial(ctx context.Context, req *Request) (*poolConn, error) {
	start := time.Now()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.t.HandshakeTimeout)
	defer cancel()
	dp := &dialParams{key: req.Key, addr: req.Addr, src: req.BindSrc}
	dctx = context.WithValue(dctx, dialKey{}, dp)
	cc, err := p.tr.NewClientConn(dctx, "https", req.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("hbone: connect to %s (%s): %w", req.Addr, req.Key.Dst, err)
	}
	end := start.Add(p.t.MaxConnectionAge)
	if !dp.notAfter.IsZero() && dp.notAfter.Before(end) {
		end = dp.notAfter
	}
	now := time.Now()
	return &poolConn{cc: cc, idleAt: now, retireAt: retireTime(now, end)}, nil
}

func (p *Pool) dialTLS(ctx context.Context, _, _ string) (net.Conn, error) {
	dp, _ := ctx.Value(dialKey{}).(*dialParams)
	if dp == nil {
		return nil, errors.New("hbone: dial without parameters")
	}
	svid, err := p.cfg.SVID(ctx, dp.key.Src)
	if err != nil {
		return nil, fmt.Errorf("hbone: SVID of %s: %w", dp.key.Src, err)
	}
	raw, err := p.cfg.Dial(ctx, dp.src, dp.addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, ClientConfig(svid, p.cfg.Bundles, dp.key.Dst))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone: TLS handshake: %w", err)
	}
	p.stats.handshakes.Add(1)
	dp.notAfter = svid.Certificates[0].NotAfter
	if peer := tc.ConnectionState().PeerCertificates; len(peer) > 0 && peer[0].NotAfter.Before(dp.notAfter) {
		dp.notAfter = peer[0].NotAfter
	}
	return tc, nil
}
