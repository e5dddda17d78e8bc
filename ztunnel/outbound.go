package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// HandleOutbound serves one captured connection of a local pod: RemoteAddr
// is the client pod, LocalAddr the original destination. A service VIP is
// resolved to an endpoint; a meshed destination on another node is reached
// over HBONE, one on this node directly (same authorization, no TLS), and a
// destination outside the mesh in plaintext. It closes conn before it
// returns: with a FIN only after an orderly end of both directions, with a
// reset otherwise (a refusal included).
func (p *Proxy) HandleOutbound(ctx context.Context, conn net.Conn) {
	ended := make(chan struct{})
	p.handleOutbound(ctx, conn, func() { close(ended) })
	<-ended
}

// handleOutbound is HandleOutbound without the wait: it returns once the
// flow is spliced or failed, and calls finish once the flow ended and conn
// is closed. A spliced flow between sockets outside Go's poller keeps no
// goroutine while it is idle (startSplice).
func (p *Proxy) handleOutbound(ctx context.Context, conn net.Conn, finish func()) {
	o := &outboundFlow{ctx: ctx, conn: conn}
	p.openOutbound(o)
	if o.peer == nil {
		p.closeOutbound(o)
		finish()
		return
	}
	o.spliced = true
	startSplice(o.ctx, asHalf(conn), o.peer, &o.l.sent, &o.l.received, func(sent, received int64, end error) {
		o.rec.Sent, o.rec.Received, o.end = sent, received, end
		p.closeOutbound(o)
		finish()
	})
}

// outboundFlow is a captured connection's flow, as handleOutbound keeps
// it.
type outboundFlow struct {
	ctx     context.Context // the flow's, once registered
	conn    net.Conn
	rec     *FlowRecord
	l       *LiveFlow // nil: not admitted
	up      net.Conn  // the connection dialled without a tunnel
	peer    halfConn  // what conn is spliced to (up, or the HBONE stream); nil: the flow failed
	spliced bool
	end     error // why the splice ended
}

// openOutbound routes, authorizes and registers a captured connection's
// flow and connects it: over HBONE (once the destination answered 200,
// the stream is spliced to conn as a delivery socket would be), or
// directly.
func (p *Proxy) openOutbound(o *outboundFlow) {
	armReset(o.conn)
	rec := &FlowRecord{Direction: Outbound, Start: time.Now()}
	o.rec = rec
	f := p.routeOutbound(o.conn, rec)
	if f == nil || !p.authorize(o.ctx, rec, f) {
		return
	}
	l, ctx, ok := p.track(o.ctx, rec, f)
	if !ok {
		return
	}
	o.l, o.ctx = l, ctx
	if rec.Path == PathHBONE {
		if st := p.connectHBONE(ctx, rec); st != nil {
			o.peer = st
		}
		return // on failure closeOutbound resets conn
	}
	up, flag, err := p.dialDest(ctx, rec.Src.Addr(), rec.Dst)
	if err != nil {
		rec.Flag, rec.Err = flag, err
		return
	}
	o.up, o.peer = up, asHalf(up)
}

// closeOutbound ends a captured connection's flow: the connection dialled
// is closed, the flow leaves the registry, its record is written and conn
// is closed (with a reset, unless the splice ended in order).
func (p *Proxy) closeOutbound(o *outboundFlow) {
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
	o.conn.Close()
}

// routeOutbound decides where conn goes (rec.Path, rec.Dst): it returns
// the flow to authorize, or nil with the reason in rec.
func (p *Proxy) routeOutbound(conn net.Conn, rec *FlowRecord) *Flow {
	src, _ := hbone.AddrOf(conn.RemoteAddr())
	dst, _ := hbone.AddrOf(conn.LocalAddr())
	rec.Src, rec.OrigDst, rec.Dst = src, dst, dst
	if p.ports[dst.Port()] {
		rec.Flag, rec.Err = FlagLoop, fmt.Errorf("ztunnel: %s is the ztunnel's own port", dst)
		return nil
	}
	snap := p.cfg.Store.Load()
	srcW := p.localWorkload(snap, src.Addr())
	if srcW == nil {
		rec.Flag, rec.Err = FlagUnknownSource, fmt.Errorf("ztunnel: no enrolled workload of node %s has IP %s", p.cfg.NodeName, src.Addr())
		return nil
	}
	rec.SrcWorkload = srcW
	srcID, err := srcW.ID(p.cfg.TrustDomain)
	if err != nil {
		rec.Flag, rec.Err = FlagNoSVID, err
		return nil
	}
	rec.SrcID, rec.MTLS = srcID, true

	rec.Service, rec.Dst, rec.DstWorkload = Resolve(snap, dst, p.pick.Add(1))
	target, dstW := rec.Dst, rec.DstWorkload

	if dstW == nil || !dstW.Enrolled {
		rec.Path, rec.MTLS = PathPassthrough, false
		f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target}
		return f
	}
	dstID, err := dstW.ID(p.cfg.TrustDomain)
	if err != nil {
		rec.Flag, rec.Err = FlagNoSVID, err
		return nil
	}
	rec.DstID = dstID
	if dstW.Node == p.cfg.NodeName {
		rec.Path = PathLocal
		f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target, MTLS: true}
		return f
	}
	rec.Path = PathHBONE
	// The destination's ztunnel decides; asking here too lets a denial
	// fail fast without a tunnel.
	f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target, MTLS: true, PreCheck: true}
	return f
}

// Resolve finds where a connection to dst goes, as the ztunnel does before
// it asks policy: a service VIP:port becomes one of the service's endpoints
// at its target port (pick chooses which; the ztunnel passes a counter to
// spread connections), any other address stays as it is. w is the
// workload at target, nil for an address outside the cluster's workloads;
// only an enrolled w is in the mesh. 'mantlet policy check' calls it too.
func Resolve(snap *workload.Snapshot, dst netip.AddrPort, pick uint32) (svc *workload.Service, target netip.AddrPort, w *workload.Workload) {
	if svc, ep, w, ok := snap.ResolveService(dst, pick); ok {
		return svc, ep, w
	}
	return nil, dst, snap.WorkloadByIP(dst.Addr())
}

// authorize asks the Authorizer; on denial it fills rec and returns false.
func (p *Proxy) authorize(ctx context.Context, rec *FlowRecord, f *Flow) bool {
	v := p.authz.Authorize(ctx, f)
	rec.Verdict = v
	if v.Allow {
		return true
	}
	rec.Flag = v.Flag
	if rec.Flag == FlagNone {
		rec.Flag = FlagPolicyDenied
	}
	rec.Err = fmt.Errorf("ztunnel: denied by policy %q", v.Policy)
	return false
}

// admit authorizes f and tracks it as a live flow, then runs serve with
// the flow and its context; on denial or when the flow cannot be tracked it
// leaves the reason in rec and does not call serve.
func (p *Proxy) admit(ctx context.Context, rec *FlowRecord, f *Flow, serve func(ctx context.Context, l *LiveFlow)) {
	// Policy and the registry's hooks (metrics, access log) run deep: on a
	// goroutine of their own.
	var (
		l  *LiveFlow
		ok bool
	)
	shallow(func() {
		if p.authorize(ctx, rec, f) {
			l, ctx, ok = p.track(ctx, rec, f)
		}
	})
	if !ok {
		return
	}
	defer p.untrack(l, rec)
	serve(ctx, l)
}

// direct connects to target without a tunnel and splices.
func (p *Proxy) direct(ctx context.Context, rec *FlowRecord, l *LiveFlow, conn net.Conn, src netip.Addr, target netip.AddrPort) {
	var (
		up   net.Conn
		flag ResponseFlag
		err  error
	)
	shallow(func() { up, flag, err = p.dialDest(ctx, src, target) })
	if err != nil {
		rec.Flag, rec.Err = flag, err
		return
	}
	defer up.Close()
	var end error
	rec.Sent, rec.Received, end = splice(ctx, asHalf(conn), asHalf(up), &l.sent, &l.received)
	p.ended(rec, end)
}

// connectHBONE opens the flow's CONNECT stream; on failure it returns nil
// with the reason in rec.
func (p *Proxy) connectHBONE(ctx context.Context, rec *FlowRecord) *hbone.Stream {
	req := &hbone.Request{
		Key:       hbone.Key{Src: rec.SrcID, Dst: rec.DstID, DstIP: rec.Dst.Addr()},
		Addr:      p.hboneAddr(rec.Dst.Addr(), rec.DstWorkload),
		Target:    rec.Dst,
		Forwarded: rec.Src,
	}
	if p.cfg.Transparent {
		req.BindSrc = rec.Src.Addr()
	}
	st, err := p.pool.Connect(ctx, req)
	if err == nil {
		return st
	}
	rec.Err = err
	var re *hbone.RefusedError
	switch {
	case errors.As(err, &re):
		rec.Flag = FlagHBONERefused
		if re.Status == http.StatusUnauthorized {
			// The destination's Authorizer refused the flow.
			rec.Admitted = rec.Verdict
			rec.Verdict = Verdict{Flag: FlagHBONERefused, Rule: -1, Reason: ReasonDeniedByDestination}
		}
	case errors.Is(err, hbone.ErrStreamLimit):
		rec.Flag = FlagStreamLimit
	case tlsFlag(err) != FlagTLSHandshake:
		rec.Flag = tlsFlag(err)
	default:
		rec.Flag = FlagHBONEConnectFailed
	}
	return nil
}

// asHalf gives conns without CloseWrite one that closes them entirely.
func asHalf(c net.Conn) halfConn {
	if h, ok := c.(halfConn); ok {
		return h
	}
	return fullCloser{c}
}

type fullCloser struct{ net.Conn }

func (f fullCloser) CloseWrite() error { return f.Close() }

// shallow runs fn on a goroutine of its own and waits for it. A flow's
// goroutine waits for its sockets for as long as the flow stays open, with
// the stack it grew to: run on it, the deep calls of a flow's setup
// (policy, dialling, the CONNECT) would leave every idle flow a stack of
// 4 or 8 KiB where 2 KiB hold its wait. The extra goroutine exits with
// its stack once fn returns.
func shallow(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	<-done
}
