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
	armReset(conn)
	defer conn.Close()
	rec := &FlowRecord{Direction: Outbound, Start: time.Now()}
	defer p.endFlow(rec)
	// The flow's goroutine waits on its sockets as long as the flow is
	// open: what it holds on its stack then is every idle flow's cost,
	// so the routing's locals are gone (routeOutbound returned) before
	// the flow is served.
	if f, serve := p.routeOutbound(conn, rec); f != nil {
		p.admit(ctx, rec, f, serve)
	}
}

// routeOutbound decides where conn goes: it returns the flow to authorize
// and the function that serves it, or nil with the reason in rec.
func (p *Proxy) routeOutbound(conn net.Conn, rec *FlowRecord) (*Flow, func(ctx context.Context, l *LiveFlow)) {
	src, _ := hbone.AddrOf(conn.RemoteAddr())
	dst, _ := hbone.AddrOf(conn.LocalAddr())
	rec.Src, rec.OrigDst, rec.Dst = src, dst, dst
	if p.ports[dst.Port()] {
		rec.Flag, rec.Err = FlagLoop, fmt.Errorf("ztunnel: %s is the ztunnel's own port", dst)
		return nil, nil
	}
	snap := p.cfg.Store.Load()
	srcW := p.localWorkload(snap, src.Addr())
	if srcW == nil {
		rec.Flag, rec.Err = FlagUnknownSource, fmt.Errorf("ztunnel: no enrolled workload of node %s has IP %s", p.cfg.NodeName, src.Addr())
		return nil, nil
	}
	rec.SrcWorkload = srcW
	srcID, err := srcW.ID(p.cfg.TrustDomain)
	if err != nil {
		rec.Flag, rec.Err = FlagNoSVID, err
		return nil, nil
	}
	rec.SrcID, rec.MTLS = srcID, true

	rec.Service, rec.Dst, rec.DstWorkload = Resolve(snap, dst, p.pick.Add(1))
	target, dstW := rec.Dst, rec.DstWorkload

	if dstW == nil || !dstW.Enrolled {
		rec.Path, rec.MTLS = PathPassthrough, false
		f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target}
		return f, func(ctx context.Context, l *LiveFlow) { p.direct(ctx, rec, l, conn, src.Addr(), target) }
	}
	dstID, err := dstW.ID(p.cfg.TrustDomain)
	if err != nil {
		rec.Flag, rec.Err = FlagNoSVID, err
		return nil, nil
	}
	rec.DstID = dstID
	if dstW.Node == p.cfg.NodeName {
		rec.Path = PathLocal
		f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target, MTLS: true}
		return f, func(ctx context.Context, l *LiveFlow) { p.direct(ctx, rec, l, conn, src.Addr(), target) }
	}
	rec.Path = PathHBONE
	// The destination's ztunnel decides; asking here too lets a denial
	// fail fast without a tunnel.
	f := &Flow{Direction: Outbound, SrcID: srcID, SrcAddr: src, Src: srcW, Dst: dstW, DstAddr: target, MTLS: true, PreCheck: true}
	return f, func(ctx context.Context, l *LiveFlow) { p.outboundHBONE(ctx, rec, l, conn) }
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

// outboundHBONE carries conn over an HBONE stream: once the destination
// answered 200, the stream is spliced to conn as a delivery socket would
// be.
func (p *Proxy) outboundHBONE(ctx context.Context, rec *FlowRecord, l *LiveFlow, conn net.Conn) {
	var st *hbone.Stream
	shallow(func() { st = p.connectHBONE(ctx, rec) })
	if st == nil {
		return // HandleOutbound resets conn
	}
	var end error
	rec.Sent, rec.Received, end = splice(ctx, asHalf(conn), st, &l.sent, &l.received)
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
// (policy, dialling, the CONNECT) would leave every idle flow an 8 KiB
// stack where 4 KiB hold its wait. The extra goroutine exits with its
// stack once fn returns.
func shallow(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	<-done
}
