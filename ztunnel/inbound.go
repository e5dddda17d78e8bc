package ztunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// HandleHBONE serves one HBONE connection: LocalAddr must be a local
// enrolled pod (its certificate is presented), the client must present an
// X509-SVID of a trusted domain within Tuning.HandshakeTimeout, and each
// CONNECT stream is authorized and delivered to that pod. It closes conn
// before it returns.
func (p *Proxy) HandleHBONE(ctx context.Context, conn net.Conn) { p.handleHBONE(ctx, conn, nil) }

// handleHBONE is HandleHBONE for a connection that holds ticket t of the
// pending-handshake table (nil: none). The handshake must end within
// Tuning.HandshakeTimeout of the connection's arrival; then t is given
// back, and a connection whose ticket was shed meanwhile ends (it was
// closed, counted and logged when it was shed).
func (p *Proxy) handleHBONE(ctx context.Context, conn net.Conn, t *ticket) {
	defer conn.Close()
	defer p.pending.release(t)
	local, _ := hbone.AddrOf(conn.LocalAddr())
	remote, _ := hbone.AddrOf(conn.RemoteAddr())
	if p.localWorkload(p.cfg.Store.Load(), local.Addr()) == nil {
		p.reject(FlagNoLocalWorkload, fmt.Errorf("ztunnel: HBONE to %s: no enrolled workload of node %s", local, p.cfg.NodeName),
			"src", remote, "dst", local)
		return
	}
	start := time.Now()
	if t != nil {
		start = t.start
	}
	// The deadline on the socket bounds every read and write of the
	// handshake, the context the certificate lookup.
	deadline := start.Add(p.cfg.Tuning.HandshakeTimeout)
	_ = conn.SetDeadline(deadline)
	tc := tls.Server(hbone.BatchWrites(conn), p.serverTLS)
	hctx, cancel := context.WithDeadline(ctx, deadline)
	err := tc.HandshakeContext(hctx)
	cancel()
	if t != nil && !p.pending.release(t) {
		return // shed while it was pending
	}
	if err != nil {
		flag := tlsFlag(err)
		if flag == FlagTLSHandshake && isTimeout(err) {
			flag = FlagHandshakeTimeout
			err = fmt.Errorf("%w (%v after the connection arrived)", err, p.cfg.Tuning.HandshakeTimeout)
		}
		p.reject(flag, fmt.Errorf("ztunnel: HBONE handshake: %w", err), "src", remote, "dst", local)
		return
	}
	p.serverKX.Add(tc.ConnectionState().CurveID)
	_ = conn.SetDeadline(time.Time{})
	p.srv.ServeConn(ctx, tc)
}

// isTimeout reports whether err says a deadline passed.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// serveStream handles one CONNECT stream of an HBONE connection (the
// server's handler). Once the stream is spliced to the destination's
// connection the handler returns: the stream is detached from its
// goroutine (hbone.Stream.Detach), keeps its charge against the
// connection's stream limit, and is closed when the splice ended.
func (p *Proxy) serveStream(ctx context.Context, s *hbone.Stream) {
	o := &inboundStream{ctx: ctx}
	p.openStream(s, o)
	if o.up == nil {
		p.closeStream(o)
		return
	}
	o.spliced = true
	done := s.Detach()
	startSplice(o.ctx, s, asHalf(o.up), &o.l.sent, &o.l.received, func(sent, received int64, end error) {
		o.rec.Sent, o.rec.Received, o.end = sent, received, end
		p.closeStream(o)
		done()
	})
}

// inboundStream is a CONNECT stream's flow, as serveStream keeps it.
type inboundStream struct {
	rec     *FlowRecord
	ctx     context.Context // the flow's, once registered
	l       *LiveFlow       // nil: refused, answered already
	up      net.Conn        // the connection to the destination; nil: the dial failed, answered already
	spliced bool
	end     error // why the splice ended
}

// openStream checks, authorizes and registers a CONNECT stream's flow,
// dials its destination and answers the stream.
func (p *Proxy) openStream(s *hbone.Stream, o *inboundStream) {
	rec := &FlowRecord{Direction: Inbound, Path: PathHBONE, Start: time.Now(), SrcID: s.Conn.PeerID, MTLS: true}
	o.rec = rec
	f, status := p.streamFlow(s, rec)
	// The request's headers are read: their map would stay as long as
	// the flow (about 400 bytes a stream).
	s.Header = nil
	if f == nil {
		_ = s.Respond(status)
		return
	}
	if !p.authorize(o.ctx, rec, f) {
		_ = s.Respond(http.StatusUnauthorized)
		return
	}
	l, ctx, ok := p.track(o.ctx, rec, f)
	if !ok {
		_ = s.Respond(http.StatusServiceUnavailable)
		return
	}
	o.l, o.ctx = l, ctx
	o.up = p.dialStream(ctx, s, rec)
}

// closeStream ends a CONNECT stream's flow: the destination's connection
// is closed, the flow leaves the registry and its record is written.
func (p *Proxy) closeStream(o *inboundStream) {
	if o.spliced {
		p.ended(o.rec, o.end)
	}
	if o.up != nil {
		o.up.Close()
	}
	if o.l != nil {
		p.untrack(o.l, o.rec)
	}
	if o.rec != nil {
		p.endFlow(o.rec)
	}
}

// dialStream connects to the stream's destination and answers the
// CONNECT: 200 with the connection, or an error status with nil and the
// reason in rec.
func (p *Proxy) dialStream(ctx context.Context, s *hbone.Stream, rec *FlowRecord) net.Conn {
	up, flag, err := p.dialDest(ctx, rec.Src.Addr(), rec.Dst)
	if err != nil {
		rec.Flag, rec.Err = flag, err
		_ = s.Respond(http.StatusServiceUnavailable)
		return nil
	}
	if err := s.Respond(http.StatusOK); err != nil {
		rec.Err = err
		up.Close()
		return nil
	}
	return up
}

// streamFlow checks a CONNECT stream's target and source and returns the
// flow to authorize, or nil with the status to answer and the reason in
// rec.
func (p *Proxy) streamFlow(s *hbone.Stream, rec *FlowRecord) (*Flow, int) {
	rec.Src = s.Conn.Remote
	fail := func(status int, flag ResponseFlag, err error) (*Flow, int) {
		rec.Flag, rec.Err = flag, err
		return nil, status
	}
	target, err := hbone.ParseTarget(s.Authority)
	if err != nil {
		return fail(http.StatusBadRequest, FlagMalformed, err)
	}
	rec.Dst, rec.OrigDst = target, target
	if target.Addr() != s.Conn.Local.Addr() {
		return fail(http.StatusBadRequest, FlagRelayRefused,
			fmt.Errorf("ztunnel: CONNECT target %s is not the addressed pod %s", target, s.Conn.Local.Addr()))
	}
	if p.ports[target.Port()] {
		return fail(http.StatusBadRequest, FlagLoop, fmt.Errorf("ztunnel: CONNECT to the ztunnel's own port %s", target))
	}
	snap := p.cfg.Store.Load()
	dstW := p.localWorkload(snap, target.Addr())
	if dstW == nil {
		return fail(http.StatusServiceUnavailable, FlagNoLocalWorkload, fmt.Errorf("ztunnel: %s is no local workload", target.Addr()))
	}
	rec.DstWorkload = dstW
	rec.DstID, _ = dstW.ID(p.cfg.TrustDomain)

	// The caller's identity is its certificate's; a Forwarded source is
	// believed only if that address belongs to a workload of the same
	// identity.
	if v := s.Header.Get("Forwarded"); v != "" {
		claimed, ok, err := hbone.ParseForwarded(v)
		switch {
		case err != nil:
			p.log.Info("ztunnel: ignoring malformed Forwarded header", "src", s.Conn.Remote, "src_id", s.Conn.PeerID, "error", err)
		case ok:
			if p.sameIdentity(snap.WorkloadByIP(claimed.Addr()), s.Conn.PeerID) {
				rec.Src = claimed
			} else {
				p.reject(FlagForwardedSpoofed,
					fmt.Errorf("ztunnel: Forwarded claims %s, which is not a workload of %s; using the TLS peer's address", claimed, s.Conn.PeerID),
					"src", s.Conn.Remote, "src_id", s.Conn.PeerID, "dst", target)
			}
		}
	}
	if w := snap.WorkloadByIP(rec.Src.Addr()); p.sameIdentity(w, s.Conn.PeerID) {
		rec.SrcWorkload = w
	}
	return &Flow{Direction: Inbound, SrcID: rec.SrcID, SrcAddr: rec.Src, Src: rec.SrcWorkload, Dst: dstW, DstAddr: target, MTLS: true}, 0
}

// HandleInbound serves one plaintext connection to a local pod (:15006):
// the source is unauthenticated (Flow.MTLS false), the destination must be
// a local enrolled workload, and the Authorizer decides. It closes conn
// before it returns: with a FIN only after an orderly end of both
// directions, with a reset otherwise (a refusal included).
func (p *Proxy) HandleInbound(ctx context.Context, conn net.Conn) {
	armReset(conn)
	defer conn.Close()
	rec := &FlowRecord{Direction: InboundPlaintext, Path: PathLocal, Start: time.Now()}
	defer p.endFlow(rec)
	rec.Src, _ = hbone.AddrOf(conn.RemoteAddr())
	rec.Dst, _ = hbone.AddrOf(conn.LocalAddr())
	rec.OrigDst = rec.Dst
	if p.ports[rec.Dst.Port()] {
		rec.Flag, rec.Err = FlagLoop, fmt.Errorf("ztunnel: %s is the ztunnel's own port", rec.Dst)
		return
	}
	snap := p.cfg.Store.Load()
	dstW := p.localWorkload(snap, rec.Dst.Addr())
	if dstW == nil {
		rec.Flag, rec.Err = FlagNoLocalWorkload, fmt.Errorf("ztunnel: %s is no local workload", rec.Dst.Addr())
		return
	}
	rec.DstWorkload = dstW
	rec.DstID, _ = dstW.ID(p.cfg.TrustDomain)
	rec.SrcWorkload = snap.WorkloadByIP(rec.Src.Addr())
	f := &Flow{Direction: InboundPlaintext, SrcAddr: rec.Src, Src: rec.SrcWorkload, Dst: dstW, DstAddr: rec.Dst}
	p.admit(ctx, rec, f, func(ctx context.Context, l *LiveFlow) { p.direct(ctx, rec, l, conn, rec.Src.Addr(), rec.Dst) })
}

// sameIdentity reports whether w exists and has identity id.
func (p *Proxy) sameIdentity(w *workload.Workload, id spiffeid.ID) bool {
	if w == nil {
		return false
	}
	wid, err := w.ID(p.cfg.TrustDomain)
	return err == nil && wid == id
}
