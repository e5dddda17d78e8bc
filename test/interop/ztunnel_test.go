package interop

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
)

// The tests' cluster: pod shop/frontend-0 on node-a at ipFrontend, pod
// shop/checkout-0 on node-b at ipCheckout. Istio's client stands in for
// node-a's ztunnel (it connects from 127.0.0.1), Istio's server for
// node-b's.
var (
	ipFrontend = netip.MustParseAddr("127.0.1.1")
	ipCheckout = netip.MustParseAddr("127.0.2.1")
)

func (p *pki) store(t *testing.T) *workload.Store {
	t.Helper()
	snap, err := workload.New(
		[]workload.Node{{Name: "node-a", IP: netip.MustParseAddr("127.0.0.11")}, {Name: "node-b", IP: netip.MustParseAddr("127.0.0.12")}},
		[]workload.Workload{
			{UID: "a1", Name: "frontend-0", Namespace: "shop", ServiceAccount: "frontend", Node: "node-a", IPs: []netip.Addr{ipFrontend}, Enrolled: true},
			{UID: "b1", Name: "checkout-0", Namespace: "shop", ServiceAccount: "checkout", Node: "node-b", IPs: []netip.Addr{ipCheckout}, Enrolled: true},
		}, nil)
	if err != nil {
		t.Fatal(err)
	}
	st := workload.NewStore()
	st.Replace(snap)
	return st
}

// svids is a ztunnel.SVIDSource that mints one SVID per identity from the
// test CA on first use.
type svids struct {
	p  *pki
	t  *testing.T
	mu sync.Mutex
	m  map[spiffeid.ID]*x509svid.SVID
}

func (s *svids) SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if v := s.m[id]; v != nil {
		return v, nil
	}
	ns, sa, err := identity.ParseWorkloadID(id)
	if err != nil {
		return nil, err
	}
	v := s.p.svid(s.t, ns, sa)
	s.m[id] = v
	return v, nil
}

// ztunnelOpts are what the tests vary about a ztunnel.
type ztunnelOpts struct {
	node  string
	authz ztunnel.Authorizer
	// hbone, if set, is the address the ztunnel's HBONE listener binds.
	hbone string
	// outboundTo, if valid, makes an outbound listener whose accepted
	// connections report it as their original destination (what the
	// capture does), and hboneAddr is where HBONE to any pod is sent.
	outboundTo netip.AddrPort
	hboneAddr  netip.AddrPort
}

// runningZtunnel is one of our ztunnels with what the tests observe.
type runningZtunnel struct {
	*ztunnel.Proxy
	hbone    netip.AddrPort // HBONE listener
	outbound netip.AddrPort // outbound listener
	flows    chan *ztunnel.FlowRecord
	svids    *svids
}

func (p *pki) ztunnel(t *testing.T, o ztunnelOpts) *runningZtunnel {
	t.Helper()
	z := &runningZtunnel{
		flows: make(chan *ztunnel.FlowRecord, 16),
		svids: &svids{p: p, t: t, m: map[spiffeid.ID]*x509svid.SVID{}},
	}
	cfg := ztunnel.Config{
		NodeName:    o.node,
		TrustDomain: testTD,
		Store:       p.store(t),
		SVIDs:       z.svids,
		Bundles:     p.bundle,
		Authorizer:  o.authz,
		Logger:      testLogger(t),
		OnFlowEnd: func(r *ztunnel.FlowRecord) {
			select {
			case z.flows <- r:
			default:
			}
		},
	}
	if o.hbone != "" {
		ln := listen(t, o.hbone)
		z.hbone = ln.Addr().(*net.TCPAddr).AddrPort()
		cfg.HBONE = ln
	}
	if o.outboundTo.IsValid() {
		ln := listen(t, "127.0.0.1:0")
		z.outbound = ln.Addr().(*net.TCPAddr).AddrPort()
		cfg.Outbound = &origDstListener{Listener: ln, orig: net.TCPAddrFromAddrPort(o.outboundTo)}
		cfg.HBONEAddr = func(netip.Addr, *workload.Workload) netip.AddrPort { return o.hboneAddr }
	}
	px, err := ztunnel.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	z.Proxy = px
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- px.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ztunnel %s: Run: %v", o.node, err)
		}
	})
	return z
}

func listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// origDstListener stands in for the eBPF capture: the connections it
// accepts report orig as their local address, the original destination.
type origDstListener struct {
	net.Listener
	orig net.Addr
}

func (l *origDstListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return origDstConn{Conn: c, orig: l.orig}, nil
}

type origDstConn struct {
	net.Conn
	orig net.Addr
}

func (c origDstConn) LocalAddr() net.Addr { return c.orig }

// CloseWrite keeps half-close working through the wrapper.
func (c origDstConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

// flowRecorder is an Authorizer that records the flows it is asked about
// and answers with verdict.
type flowRecorder struct {
	verdict ztunnel.Verdict
	flows   chan ztunnel.Flow
}

func newFlowRecorder(allow bool) *flowRecorder {
	return &flowRecorder{verdict: ztunnel.Verdict{Allow: allow}, flows: make(chan ztunnel.Flow, 16)}
}

func (r *flowRecorder) Authorize(_ context.Context, f *ztunnel.Flow) ztunnel.Verdict {
	select {
	case r.flows <- *f:
	default:
	}
	return r.verdict
}

// testLogger shows the ztunnel's logs (rejections with their reasons)
// under -v.
func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}
