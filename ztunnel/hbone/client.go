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
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Key identifies a pool of connections: streams are multiplexed only
// between the same source identity, destination identity and destination
// pod IP. Connections bound to a source address (Request.BindSrc) are
// pooled per address as well: see poolKey.
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
	mu    sync.Mutex
	keys  map[poolKey]*keyConns
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
	stats struct{ handshakes, streams atomic.Uint64 }
	kx    KeyExchangeCounter
	idles []time.Duration // reapLocked's, guarded by mu
}

// poolKey is what a pooled connection is shared by: its Key and the
// source address it is bound to. A connection bound to one client pod's
// address carries only that pod's streams: the replies to that address
// reach the ztunnel only while the pod is there (on the node, capture
// hands them to the ztunnel by the pod's address), so a connection bound
// to a pod that is gone is dead in one direction, and another pod of the
// same identity must not be given its streams.
type poolKey struct {
	Key
	src netip.Addr
}

// keyOf returns the pool a request's streams share.
func keyOf(req *Request) poolKey { return poolKey{Key: req.Key, src: req.BindSrc} }

type keyConns struct {
	conns   []*poolConn
	dialing *dialAttempt
}

type dialAttempt struct {
	done chan struct{}
	err  error
}

// poolConn is a pooled connection; its stream count, idle time and
// retirement (a margin before its end of life, see retireTime) are the
// connection's own (clientState).
type poolConn struct {
	hc *h2conn
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

// NewPool returns a pool; Close it to stop its reaper and close its
// connections.
func NewPool(cfg PoolConfig) *Pool {
	p := &Pool{
		cfg:  cfg,
		t:    cfg.Tuning.WithDefaults(),
		log:  cfg.Logger,
		keys: make(map[poolKey]*keyConns),
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
	go p.reap()
	return p
}

// Stats counts TLS handshakes made and streams opened.
type Stats struct {
	Handshakes, Streams uint64
	// KeyExchanges counts the handshakes by the key exchange group they
	// agreed on (KeyExchangeCounter.Counts).
	KeyExchanges map[string]uint64
}

// Stats returns the pool's counters.
func (p *Pool) Stats() Stats {
	return Stats{Handshakes: p.stats.handshakes.Load(), Streams: p.stats.streams.Load(), KeyExchanges: p.kx.Counts()}
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
		c.hc.close()
	}
}

func (p *Pool) reap() {
	defer close(p.done)
	tick := time.NewTicker(max(p.t.SpareIdleTimeout/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-tick.C:
			p.mu.Lock()
			// Not the tick's time: under load the tick is read late, and
			// a stream may have ended after it.
			dead := p.reapLocked(time.Now())
			p.mu.Unlock()
			for _, c := range dead {
				p.log.Debug("hbone: closing idle connection")
				c.hc.close()
			}
		}
	}
}

// reapLocked takes out of the pool, and returns for closing, the
// connections that are gone, retired and idle, idle for IdleTimeout, or
// idle for SpareIdleTimeout while their key keeps another idle one: of a
// key's idle connections the oldest one idle for less than half of
// IdleTimeout stays (else the one idle for the shortest time), the others
// are spares. The oldest, because a burst's connections are the newest:
// keeping one of them would keep its memory (TLS state, buffers, HTTP/2
// tables) among the burst's freed objects, where it keeps whole pages of
// the heap in use; the half, so that the server, which closes after
// IdleTimeout too, is not about to close the one kept.
func (p *Pool) reapLocked(now time.Time) []*poolConn {
	var dead []*poolConn
	for k, kc := range p.keys {
		keep := -1 // the connection kept idle; kc.conns is oldest first
		var keepIdle time.Duration
		idles := slices.Grow(p.idles[:0], len(kc.conns))[:len(kc.conns)]
		p.idles = idles
		for i, c := range kc.conns {
			idle, gone, retired := c.hc.idleState(now)
			idle = max(idle, 0) // negative marks a connection to close
			switch {
			case gone || idle >= p.t.IdleTimeout || idle > 0 && retired:
				idle = -1 // closed below
			case idle == 0:
			case keep < 0,
				keepIdle >= p.t.IdleTimeout/2 && idle < keepIdle:
				keep, keepIdle = i, idle
			}
			idles[i] = idle
		}
		live := kc.conns[:0]
		for i, c := range kc.conns {
			if idles[i] < 0 || i != keep && idles[i] >= p.t.SpareIdleTimeout {
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
	return dead
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
	// client pod's IP with transparent sockets). Streams share only
	// connections bound to the same address.
	BindSrc netip.Addr
	// Target is the CONNECT :authority, the destination pod's ip:port.
	Target netip.AddrPort
	// Forwarded, if valid, is sent as Forwarded: for="ip:port".
	Forwarded netip.AddrPort
	// Header holds extra request headers; it must not change while the
	// stream is open.
	Header http.Header
	// Body, if set, is sent on the stream by a goroutine of the pool: read
	// until EOF, which half-closes the stream (CloseWrite); a read error
	// resets it (CANCEL). Body is never closed by the pool. Without a
	// Body the caller writes the stream itself.
	Body io.Reader
}

// Connect opens a CONNECT stream to req.Target over a pooled connection
// for req.Key, dialing (and handshaking) a new connection when none has a
// free stream slot, and returns it once the server answered 200. A
// request the server did not process (a refused stream, GOAWAY) is tried
// once more. Errors wrap ErrRefused (with a *RefusedError),
// ErrStreamLimit, the TLS verification errors of this package, or the
// dial error.
func (p *Pool) Connect(ctx context.Context, req *Request) (*Stream, error) {
	for attempt := 0; ; attempt++ {
		pc, err := p.get(ctx, req)
		if err != nil {
			return nil, err
		}
		st, err := pc.hc.open(ctx, req)
		var re *RefusedError
		switch {
		case err == nil:
		case errors.As(err, &re):
			return nil, err
		case errors.Is(err, errRetry) && attempt == 0:
			p.log.Debug("hbone: CONNECT not processed, trying again", "target", req.Target, "error", err)
			continue
		default:
			return nil, fmt.Errorf("hbone: CONNECT %s via %s: %w", req.Target, req.Addr, err)
		}
		p.stats.streams.Add(1)
		if req.Body != nil {
			go sendBody(st, req.Body)
		}
		return st, nil
	}
}

// sendBody copies body to st, then half-closes st; a read error resets it.
func sendBody(st *Stream, body io.Reader) {
	buf := GetBuf()
	defer PutBuf(buf)
	for {
		n, err := body.Read(*buf)
		if n > 0 {
			if _, werr := st.Write((*buf)[:n]); werr != nil {
				return
			}
		}
		switch {
		case err == io.EOF:
			_ = st.CloseWrite()
			return
		case err != nil:
			st.Reset(http2.ErrCodeCancel)
			return
		}
	}
}

// get reserves a stream slot on a connection for req.Key: on an idle
// one, else on a new one while the key has fewer than SpreadConnsPerKey
// connections, else on the one with the fewest streams. One dial at a
// time runs for a key; the others wait for it. A waiter whose dial
// attempt failed tries once more (dialling itself, or waiting for the
// next dial) before it takes that error as its own: one dial that timed
// out under load does not fail every stream that was waiting for it. A
// dial that only spreads streams never fails one: if it fails, the
// stream shares a connection.
func (p *Pool) get(ctx context.Context, req *Request) (*poolConn, error) {
	waitedFailed := false
	spread := true // false once a dial to spread failed
	for {
		select {
		case <-p.stop:
			return nil, ErrPoolClosed
		default:
		}
		p.mu.Lock()
		key := keyOf(req)
		kc := p.keys[key]
		if kc == nil {
			kc = &keyConns{}
			p.keys[key] = kc
		}
		now := time.Now()
		usable := 0
		var least *poolConn // the connection with room and the fewest streams
		leastActive := 0
		for _, c := range kc.conns {
			_, dead, retired := c.hc.idleState(now)
			if dead || retired {
				continue // gone, or draining: closed once its streams are done
			}
			usable++
			if active, room := c.hc.load(p.t.MaxStreamsPerConn, now); room && (least == nil || active < leastActive) {
				least, leastActive = c, active
			}
		}
		if least != nil && (leastActive == 0 || !spread || usable >= p.t.SpreadConnsPerKey) {
			if least.hc.reserve(p.t.MaxStreamsPerConn, now) {
				p.mu.Unlock()
				return least, nil
			}
			p.mu.Unlock()
			continue // it ended or filled meanwhile
		}
		if a := kc.dialing; a != nil {
			p.mu.Unlock()
			select {
			case <-a.done:
				if a.err != nil {
					if least != nil {
						spread = false
						continue
					}
					if waitedFailed || ctx.Err() != nil {
						return nil, a.err
					}
					waitedFailed = true
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
			if least != nil {
				p.log.Debug("hbone: dial to spread streams failed, sharing a connection", "key", req.Key, "error", err)
				spread = false
				continue
			}
			return nil, err
		}
		// The dialler gets a stream on its connection even if it is
		// already retired (a certificate about to expire): the server
		// decides then.
		if pc.hc.reserve(p.t.MaxStreamsPerConn, time.Time{}) {
			p.mu.Unlock()
			return pc, nil
		}
		p.mu.Unlock()
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
	fail := func(err error) (*poolConn, error) {
		return nil, fmt.Errorf("hbone: connect to %s (%s): %w", req.Addr, req.Key.Dst, err)
	}
	svid, err := p.cfg.SVID(dctx, req.Key.Src)
	if err != nil {
		return fail(fmt.Errorf("hbone: SVID of %s: %w", req.Key.Src, err))
	}
	raw, err := p.cfg.Dial(dctx, req.BindSrc, req.Addr)
	if err != nil {
		return fail(err)
	}
	tcfg := ClientConfig(svid, p.cfg.Bundles, req.Key.Dst)
	tcfg.CurvePreferences = p.t.KeyExchange
	tc := tls.Client(BatchWrites(raw), tcfg)
	if err := tc.HandshakeContext(dctx); err != nil {
		raw.Close()
		return fail(fmt.Errorf("hbone: TLS handshake: %w", err))
	}
	cs := tc.ConnectionState()
	p.stats.handshakes.Add(1)
	p.kx.Add(cs.CurveID)
	end := start.Add(p.t.MaxConnectionAge)
	if na := svid.Certificates[0].NotAfter; na.Before(end) {
		end = na
	}
	if peer := cs.PeerCertificates; len(peer) > 0 && peer[0].NotAfter.Before(end) {
		end = peer[0].NotAfter
	}
	now := time.Now()
	hc, err := startClient(tc, p.t, p.log, retireTime(now, end))
	if err != nil {
		tc.Close()
		return fail(err)
	}
	return &poolConn{hc: hc}, nil
}
