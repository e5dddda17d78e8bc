// Package ztunnel is mantlet's node proxy. It takes connections captured
// from the node's enrolled pods (outbound, :15001), HBONE connections from
// other nodes' ztunnels (:15008) and, optionally, plaintext connections to
// local pods (:15006); it resolves workloads and services from the
// workload snapshot, asks an Authorizer, and carries each connection
// inside mutual TLS (HBONE, package hbone) to the destination's node, or
// directly to a destination of the same node, or in plaintext to a
// destination outside the mesh.
package ztunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/flowctx"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SVIDSource gives the X509-SVID of a local identity (identity.Manager
// implements it).
type SVIDSource interface {
	SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
}

// Flow describes a connection to authorize.
type Flow struct {
	// Direction is the flow's direction at this ztunnel: Outbound for the
	// same-node shortcut, passthrough and source pre-checks, Inbound for
	// HBONE, InboundPlaintext for :15006.
	Direction Direction
	// SrcID is the caller's authenticated identity: from its client
	// certificate (HBONE) or, for the same-node shortcut, from the veth
	// the connection came from. Zero when the source is plaintext.
	SrcID spiffeid.ID
	// SrcAddr is the client's address (pod IP and port).
	SrcAddr netip.AddrPort
	// Src is the source workload; nil when unknown.
	Src *workload.Workload
	// Dst is the destination workload; nil for a destination outside the
	// mesh (plaintext passthrough).
	Dst *workload.Workload
	// DstAddr is the destination pod's ip:port (after service
	// resolution).
	DstAddr netip.AddrPort
	// MTLS is true when SrcID is authenticated: mutual TLS, or the
	// same-node shortcut (identity bound to the sending veth).
	MTLS bool
	// PreCheck is true when the source ztunnel asks before tunnelling to
	// another node, whose ztunnel decides again with the identity from the
	// certificate. A denial fails the connection fast at the source; an
	// Authorizer should not count a pre-check against rate limits.
	PreCheck bool
}

// Verdict is an Authorizer's answer.
type Verdict struct {
	// Allow lets the flow through.
	Allow bool
	// Flag is the response flag for a denial (FlagPolicyDenied when
	// zero).
	Flag ResponseFlag
	// Policy names the deciding policy as namespace/name, "" for the
	// default.
	Policy string
	// Rule is the index of the deciding rule in Policy.
	Rule int
	// Reason, if set, says why in the policy engine's words
	// (policy.Reason.String(), e.g. "no-allow-matched"); metrics, access
	// logs and the flow API show it.
	Reason string
}

// ReasonDeniedByDestination is the Verdict.Reason of an outbound HBONE
// flow that the destination's ztunnel refused with 401: its Authorizer
// denied the flow, for a reason and by a policy only the destination's
// node records.
const ReasonDeniedByDestination = "denied-by-destination"

// Authorizer decides whether a flow may proceed. It is called once per
// connection, on the hot path: keep it fast.
type Authorizer interface {
	Authorize(ctx context.Context, f *Flow) Verdict
}

// AuthorizerFunc adapts a function to Authorizer.
type AuthorizerFunc func(ctx context.Context, f *Flow) Verdict

// Authorize calls fn.
func (fn AuthorizerFunc) Authorize(ctx context.Context, f *Flow) Verdict { return fn(ctx, f) }

// AllowAll returns an Authorizer that allows every flow.
func AllowAll() Authorizer {
	return AuthorizerFunc(func(context.Context, *Flow) Verdict { return Verdict{Allow: true} })
}

// Direction of a flow, as seen by this ztunnel.
type Direction string

// Directions.
const (
	Outbound         Direction = "outbound"
	Inbound          Direction = "inbound"
	InboundPlaintext Direction = "inbound_plaintext"
)

// Path says how a flow was carried.
type Path string

// Paths.
const (
	PathHBONE       Path = "hbone"
	PathLocal       Path = "local"
	PathPassthrough Path = "passthrough"
)

// FlowRecord describes a finished flow; Config.OnFlowEnd receives one for
// every connection the ztunnel handled past its first checks, the place for
// metrics and access logs.
type FlowRecord struct {
	// ID is the flow's id in the open-flow registry (LiveFlow.ID); 0 when
	// the flow was refused before it was registered.
	ID        uint64
	Direction Direction
	Path      Path
	// Src is the client's address; Dst the destination pod's ip:port (the
	// service endpoint when the client dialled a service).
	Src, Dst netip.AddrPort
	// OrigDst is the address the client dialled (a service VIP, or Dst).
	OrigDst netip.AddrPort
	// SrcID and DstID are the identities on both ends (zero when not
	// applicable).
	SrcID, DstID spiffeid.ID
	// SrcWorkload, DstWorkload and Service are nil when unknown.
	SrcWorkload, DstWorkload *workload.Workload
	Service                  *workload.Service
	// MTLS is true when the source identity was authenticated.
	MTLS bool
	// Sent counts bytes from client to destination, Received bytes back.
	Sent, Received int64
	// Flag is why the flow was refused or failed; FlagNone otherwise.
	Flag ResponseFlag
	// Err is the underlying error, if any.
	Err error
	// Verdict is the Authorizer's answer (zero if not asked), or the
	// refusal that ended the flow later: the Authorizer's when it was
	// asked again (LiveFlow.Deny), or the destination's (outbound HBONE
	// refused with 401: Flag FlagHBONERefused, Reason
	// ReasonDeniedByDestination).
	Verdict Verdict
	// Admitted is, when Verdict is such a later refusal, the verdict that
	// had admitted the flow here (for outbound HBONE the source's
	// pre-check); zero otherwise.
	Admitted Verdict
	// Start is when the connection arrived; Duration how long it lasted.
	Start    time.Time
	Duration time.Duration
}

// Config configures a Proxy. Store, SVIDs, Bundles and NodeName are
// required.
type Config struct {
	// NodeName is the node this ztunnel serves: its workloads are local.
	NodeName string
	// TrustDomain names identities (required).
	TrustDomain spiffeid.TrustDomain
	// Store holds the workload snapshot, read lock-free per connection.
	Store *workload.Store
	// SVIDs gives the certificates of local identities.
	SVIDs SVIDSource
	// Bundles verifies peers' certificates.
	Bundles x509bundle.Source
	// Authorizer decides every flow (default AllowAll).
	Authorizer Authorizer
	// Logger receives rejections (Info), and flow ends (Debug); nil
	// discards.
	Logger *slog.Logger

	// Outbound accepts captured connections of local pods (:15001): an
	// accepted conn's LocalAddr is the original destination, RemoteAddr
	// the client pod. Nil: none. On Linux, New takes over the socket of a
	// *net.TCPListener and closes the listener (rawListener): the
	// socket then closes with the Proxy.
	Outbound net.Listener
	// HBONE accepts mutual-TLS HBONE connections (:15008); LocalAddr is
	// the destination pod. Nil: none.
	HBONE net.Listener
	// InboundPlaintext accepts plaintext connections to local pods
	// (:15006); LocalAddr is the destination pod. Nil: none.
	InboundPlaintext net.Listener

	// HBONEPort is the port HBONE is sent to on the destination pod's IP
	// (default 15008).
	HBONEPort uint16
	// HBONEAddr, if set, maps a destination pod (IP and workload) to the
	// address to dial for HBONE; tests point it at another in-process
	// ztunnel. Default: the pod's IP, HBONEPort.
	HBONEAddr func(dst netip.Addr, w *workload.Workload) netip.AddrPort
	// Mark is set as SO_MARK on every socket the ztunnel opens (0: none).
	Mark int
	// Transparent makes connections to destinations leave from the
	// client's IP (IP_TRANSPARENT), and HBONE connections from the client
	// pod's IP. Needs root and the capture's routing.
	Transparent bool
	// ConnectTimeout bounds dialing a destination (default 5s).
	ConnectTimeout time.Duration
	// Tuning sets HBONE's HTTP/2 and pool parameters.
	Tuning hbone.Tuning
	// OnFlowEnd, if set, is called once per finished flow (from the
	// flow's goroutine; keep it quick).
	OnFlowEnd func(*FlowRecord)
	// OnFlowOpen, if set, is called once per flow when it has been
	// admitted and registered, before the ztunnel connects to the
	// destination (from the flow's goroutine; keep it quick). OnFlowEnd
	// follows with a FlowRecord of the same ID.
	OnFlowOpen func(*LiveFlow)
	// MaxFlows bounds the open flows (the registry behind OpenFlows); a
	// connection beyond it is refused with FlagFlowLimit. Default
	// DefaultMaxFlows.
	MaxFlows int
	// Limits bound unauthenticated connections, each source's
	// connections and the descriptors they may use; the log lines of
	// refusals are rate limited by it too.
	Limits Limits
	// OnReject, if set, is called for every refusal of the HBONE server
	// that is no flow (malformed requests, the stream limit, rapid reset,
	// frame floods), from the connection's read loop; keep it quick.
	OnReject func(*Rejection)
}

// Proxy is a running ztunnel.
type Proxy struct {
	cfg       Config
	log       *slog.Logger
	authz     Authorizer
	pool      *hbone.Pool
	srv       *hbone.Server
	serverTLS *tls.Config
	serverKX  hbone.KeyExchangeCounter // the :15008 handshakes, by group
	ports     map[uint16]bool
	counters  [numFlags]atomic.Uint64
	pick      atomic.Uint32
	live      *flowTable

	// The accept path (limits.go, admission.go).
	limits   Limits
	pending  *admission   // HBONE connections until their handshake ended
	plain    *admission   // inbound plaintext connections
	outbound *admission   // outbound connections
	accepted atomic.Int64 // accepted connections not yet closed
	pooled   atomic.Int64 // the HBONE pool's TCP connections
	refusals *refusalLog

	ctx    context.Context // cancelled by Close: ends every flow
	cancel context.CancelFunc
	wg     sync.WaitGroup // accept loops and flows
	flows  sync.WaitGroup // flows only
	mu     sync.Mutex
	lns    []net.Listener
	closed bool
}

// New checks cfg and returns a Proxy; call Run to serve.
func New(cfg Config) (*Proxy, error) {
	switch {
	case cfg.Store == nil:
		return nil, errors.New("ztunnel: config: Store is required")
	case cfg.SVIDs == nil:
		return nil, errors.New("ztunnel: config: SVIDs is required")
	case cfg.Bundles == nil:
		return nil, errors.New("ztunnel: config: Bundles is required")
	case cfg.NodeName == "":
		return nil, errors.New("ztunnel: config: NodeName is required")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("ztunnel: config: TrustDomain is required")
	}
	if cfg.HBONEPort == 0 {
		cfg.HBONEPort = hbone.DefaultPort
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	cfg.Tuning = cfg.Tuning.WithDefaults()
	cfg.Limits = cfg.Limits.withDefaults()
	lim := cfg.Limits
	if cfg.Outbound != nil {
		// Captured connections stay outside Go's poller (rawListener),
		// so that an idle flow holds neither a goroutine nor a record Go
		// never frees. Nothing fails after this, so the socket taken
		// over is always the Proxy's to close.
		ln, err := rawListener(cfg.Outbound)
		if err != nil {
			return nil, fmt.Errorf("ztunnel: outbound listener: %w", err)
		}
		cfg.Outbound = ln
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger, authz: cfg.Authorizer, ports: map[uint16]bool{}, live: newFlowTable(cfg.MaxFlows),
		limits:  lim,
		pending: newAdmission(lim.MaxPendingHandshakes, lim.MaxPendingPerIP, true),
		// Accepted connections beyond MaxFlows are refused by the flow
		// registry as flows; the tables only keep twice as many from
		// holding goroutines.
		plain:    newAdmission(2*cfg.MaxFlows, lim.MaxInboundPlaintextPerIP, false),
		outbound: newAdmission(2*cfg.MaxFlows, lim.MaxOutboundPerPod, false),
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.refusals = newRefusalLog(p.log, lim.RefusalLogRate)
	if p.authz == nil {
		p.authz = AllowAll()
	}
	for _, ln := range []net.Listener{cfg.Outbound, cfg.HBONE, cfg.InboundPlaintext} {
		if ln == nil {
			continue
		}
		if ap, ok := hbone.AddrOf(ln.Addr()); ok {
			p.ports[ap.Port()] = true
		}
		p.lns = append(p.lns, ln)
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.pool = hbone.NewPool(hbone.PoolConfig{
		Tuning:  cfg.Tuning,
		SVID:    cfg.SVIDs.SVID,
		Bundles: cfg.Bundles,
		Dial: func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			c, err := newDialer(cfg.Mark, src).DialContext(ctx, "tcp", dst.String())
			if err != nil {
				return nil, err
			}
			p.pooled.Add(1)
			return &countedConn{Conn: c, n: &p.pooled}, nil
		},
		Logger: p.log,
	})
	p.srv = &hbone.Server{
		Tuning:    cfg.Tuning,
		Handler:   p.serveStream,
		Refused:   p.serverRefused,
		LocalSVID: p.serverSVID,
		Logger:    p.log,
	}
	p.serverTLS = hbone.ServerConfig(p.serverSVID, cfg.Bundles)
	p.serverTLS.CurvePreferences = cfg.Tuning.WithDefaults().KeyExchange
	return p, nil
}

// Run serves the configured listeners until ctx is cancelled or Close or
// Shutdown is called; then it closes the listeners and every connection
// and returns once all goroutines ended.
func (p *Proxy) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, p.Close)
	defer stop()
	type acceptor struct {
		ln     net.Listener
		kind   listenerKind
		handle connHandler
	}
	var as []acceptor
	if p.cfg.Outbound != nil {
		as = append(as, acceptor{p.cfg.Outbound, listenOutbound, func(ctx context.Context, c net.Conn, _ *ticket, done func()) {
			p.handleOutbound(ctx, c, done)
		}})
	}
	if p.cfg.HBONE != nil {
		as = append(as, acceptor{p.cfg.HBONE, listenHBONE, func(ctx context.Context, c net.Conn, t *ticket, done func()) {
			p.handleHBONE(ctx, c, t)
			done()
		}})
	}
	if p.cfg.InboundPlaintext != nil {
		as = append(as, acceptor{p.cfg.InboundPlaintext, listenInboundPlain, func(ctx context.Context, c net.Conn, _ *ticket, done func()) {
			p.HandleInbound(ctx, c)
			done()
		}})
	}
	errc := make(chan error, len(as))
	for _, a := range as {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			errc <- p.accept(a.ln, a.kind, a.handle)
		}()
	}
	var first error
	for range as {
		if err := <-errc; err != nil && first == nil {
			first = err
			p.Close()
		}
	}
	<-p.ctx.Done()
	p.wg.Wait()
	return first
}

// accept serves one listener: every accepted connection is admitted by
// its listener's table (admitConn) before it gets a goroutine, and gives
// its ticket back when its handler returns (HBONE: earlier, when its
// handshake ended).
func (p *Proxy) accept(ln net.Listener, kind listenerKind, handle connHandler) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if p.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: the connection stays
			// in the kernel's queue. Back off (5 ms doubling to 1 s), count,
			// log at the refusals' rate, keep serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.counters[FlagAcceptFailed].Add(1)
			p.refusals.logf(slog.LevelWarn, FlagAcceptFailed, "ztunnel: accept failed", "reason", FlagAcceptFailed.String(),
				"listener", kind.String(), "addr", ln.Addr(), "error", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-p.ctx.Done():
				t.Stop()
				return nil
			}
			continue
		}
		delay = 0
		t, ok := p.admitConn(kind, c)
		if !ok {
			continue
		}
		p.accepted.Add(1)
		p.flows.Add(1)
		p.wg.Add(1)
		go p.serveConn(c, t, handle)
	}
}

// connHandler serves an accepted connection that holds ticket t; it
// calls done once the connection is closed, which may be after it
// returned.
type connHandler func(ctx context.Context, c net.Conn, t *ticket, done func())

// serveConn runs an accepted connection's handler.
func (p *Proxy) serveConn(c net.Conn, t *ticket, handle connHandler) {
	handle(p.ctx, c, t, func() { p.connDone(t) })
}

// connDone gives back an accepted connection's ticket once its handler
// is done with it.
func (p *Proxy) connDone(t *ticket) {
	defer p.wg.Done()
	defer p.flows.Done()
	t.table.release(t)
	p.accepted.Add(-1)
}

func (p *Proxy) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// stopAccepting closes the listeners.
func (p *Proxy) stopAccepting() {
	p.mu.Lock()
	p.closed = true
	lns := p.lns
	p.lns = nil
	p.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
}

// Close stops the proxy at once: listeners, HBONE connections and every
// flow are closed.
func (p *Proxy) Close() {
	p.stopAccepting()
	p.cancel()
	p.live.each(func(l *LiveFlow) bool { l.ctx.Cancel(nil); return true })
	p.srv.Close()
	p.pool.Close()
	p.refusals.summarize()
}

// Shutdown stops accepting, tells HBONE peers to go away (GOAWAY), and
// waits for the open flows to finish. If ctx ends first it closes
// everything and returns ctx's error.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.stopAccepting()
	done := make(chan struct{})
	go func() {
		p.flows.Wait()
		close(done)
	}()
	srvErr := make(chan error, 1)
	go func() { srvErr <- p.srv.Shutdown(ctx) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	p.Close()
	<-srvErr
	<-done
	return err
}

// Rejected returns how many times flag was counted.
func (p *Proxy) Rejected(flag ResponseFlag) uint64 {
	if flag >= numFlags {
		return 0
	}
	return p.counters[flag].Load()
}

// Counters returns every non-zero counter by flag.
func (p *Proxy) Counters() map[ResponseFlag]uint64 {
	m := make(map[ResponseFlag]uint64)
	for i := range p.counters {
		if n := p.counters[i].Load(); n > 0 && ResponseFlag(i) != FlagNone {
			m[ResponseFlag(i)] = n
		}
	}
	return m
}

// PoolStats returns the HBONE client pool's counters.
func (p *Proxy) PoolStats() hbone.Stats { return p.pool.Stats() }

// ServerKeyExchanges counts the HBONE connections accepted (their TLS
// handshake done), by the key exchange group agreed on.
func (p *Proxy) ServerKeyExchanges() map[string]uint64 { return p.serverKX.Counts() }

// reject counts flag and logs the refusal with its reason, at the
// refusals' rate (Limits.RefusalLogRate); for refusals that are not flows
// (handshakes, malformed requests).
func (p *Proxy) reject(flag ResponseFlag, err error, attrs ...any) {
	p.counters[flag].Add(1)
	p.refusals.logf(slog.LevelInfo, flag, "ztunnel: refused", append([]any{"reason", flag.String(), "error", err}, attrs...)...)
}

// countedConn counts itself out of n when it is first closed.
type countedConn struct {
	net.Conn
	n    *atomic.Int64
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.n.Add(-1) })
	return c.Conn.Close()
}

// endFlow is the one place where a flow ends: it counts the flag, logs
// (a refusal as "ztunnel: refused", a flow that broke at Info, one that
// ended in order at Debug), and calls OnFlowEnd.
func (p *Proxy) endFlow(r *FlowRecord) {
	r.Duration = time.Since(r.Start)
	attrs := []any{
		"direction", r.Direction, "path", r.Path, "src", r.Src, "dst", r.Dst,
		"src_id", r.SrcID, "dst_id", r.DstID, "sent", r.Sent, "received", r.Received,
		"duration", r.Duration, "reason", r.Flag.String(),
	}
	switch {
	case r.Flag.broke():
		p.counters[r.Flag].Add(1)
		p.log.Info("ztunnel: flow", append(attrs, "error", r.Err)...)
	case r.Flag != FlagNone:
		p.counters[r.Flag].Add(1)
		if r.Verdict.Policy != "" {
			attrs = append(attrs, "policy", r.Verdict.Policy, "rule", r.Verdict.Rule)
		}
		p.log.Info("ztunnel: refused", append(attrs, "error", r.Err)...)
	default:
		p.counters[FlagNone].Add(1)
		p.log.Debug("ztunnel: flow", attrs...)
	}
	if p.cfg.OnFlowEnd != nil {
		p.cfg.OnFlowEnd(r)
	}
}

// localWorkload returns the enrolled workload of this node that owns ip.
func (p *Proxy) localWorkload(snap *workload.Snapshot, ip netip.Addr) *workload.Workload {
	w := snap.WorkloadByIP(ip)
	if w == nil || w.Node != p.cfg.NodeName || !w.Enrolled {
		return nil
	}
	return w
}

// serverSVID picks the certificate for an HBONE connection addressed to
// local.
func (p *Proxy) serverSVID(ctx context.Context, local netip.Addr) (*x509svid.SVID, error) {
	w := p.localWorkload(p.cfg.Store.Load(), local)
	if w == nil {
		return nil, fmt.Errorf("ztunnel: %s is no local workload", local)
	}
	id, err := w.ID(p.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	s, err := p.cfg.SVIDs.SVID(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("ztunnel: SVID of %s: %w", id, err)
	}
	return s, nil
}

// dialDest connects to a destination, from src when transparent. The
// connection is armed to reset when closed (armReset).
func (p *Proxy) dialDest(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, ResponseFlag, error) {
	if !p.cfg.Transparent {
		src = netip.Addr{}
	}
	ctx, cancel := flowctx.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	c, err := dialTCP(ctx, p.cfg.Mark, src, dst)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, FlagConnectTimeout, fmt.Errorf("ztunnel: connect to %s: %w", dst, err)
		}
		return nil, FlagConnectFailed, fmt.Errorf("ztunnel: connect to %s: %w", dst, err)
	}
	armReset(c)
	return c, FlagNone, nil
}

func (p *Proxy) hboneAddr(ip netip.Addr, w *workload.Workload) netip.AddrPort {
	if p.cfg.HBONEAddr != nil {
		return p.cfg.HBONEAddr(ip, w)
	}
	return netip.AddrPortFrom(ip, p.cfg.HBONEPort)
}

// PoolConns returns how many pooled HBONE connections are open.
func (p *Proxy) PoolConns() int { return p.pool.Conns() }

// HBONEConns returns how many HBONE connections are open, pooled (out)
// and served (in).
func (p *Proxy) HBONEConns() int { return p.pool.Conns() + p.srv.Conns() }
