package interop

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// newPool returns our HBONE client pool presenting svid for its identity.
func (p *pki) newPool(t *testing.T, svid *x509svid.SVID) *hbone.Pool {
	t.Helper()
	pool := hbone.NewPool(hbone.PoolConfig{
		SVID: func(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
			if id != svid.ID {
				return nil, errors.New("no SVID for " + id.String())
			}
			return svid, nil
		},
		Bundles: p.bundle,
	})
	t.Cleanup(pool.Close)
	return pool
}

// TestOurClientTunnelsThroughIstioServer: mantlet's HBONE client pool opens
// CONNECT streams through Istio's HBONE server, which dials the target.
// Bytes arrive intact both ways, half-close travels through Istio's server
// to the target and back, Istio's server sees our client's SVID, the
// target as :authority and our Forwarded header over TLS 1.3 with ALPN h2
// and no SNI, and several streams share one TLS connection.
func TestOurClientTunnelsThroughIstioServer(t *testing.T) {
	p := newPKI(t)
	client := p.svid(t, "default", "client")
	server := p.svid(t, "default", "server")
	target, targetPeers := echoServer(t, "127.0.0.1:0")
	proxy, seen := p.istioServer(t, "127.0.0.1:0", server)
	pool := p.newPool(t, client)

	// The client pod the connection is forwarded for (any address: Istio's
	// server does not check it).
	podAddr := netip.MustParseAddrPort("198.19.1.7:40123")
	const streams = 3
	for i := range streams {
		body, send := io.Pipe()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cs, err := pool.Connect(ctx, &hbone.Request{
			Key:       hbone.Key{Src: client.ID, Dst: server.ID, DstIP: proxy.Addr()},
			Addr:      proxy,
			Target:    target,
			Forwarded: podAddr,
			Body:      body,
		})
		if err != nil {
			cancel()
			t.Fatalf("stream %d: connect through istio's server: %v", i, err)
		}
		payload := pattern(64<<10 + i)
		go func() {
			_, _ = send.Write(payload)
			_ = send.Close() // half-close: END_STREAM towards Istio's server
		}()
		got, err := io.ReadAll(cs) // EOF only once the target half-closed back
		cs.Close()
		cancel()
		if err != nil {
			t.Fatalf("stream %d: read until EOF: %v (after %d bytes)", i, err, len(got))
		}
		if string(got) != string(payload) {
			t.Fatalf("stream %d: got %d bytes back, want the %d sent, intact", i, len(got), len(payload))
		}

		s := <-seen
		want := connectSeen{
			Authority:  target.String(),
			Proto:      "HTTP/2.0",
			Forwarded:  `for="198.19.1.7:40123"`,
			PeerID:     client.ID,
			PeerAddr:   s.PeerAddr,
			ALPN:       "h2",
			TLSVersion: tls.VersionTLS13,
		}
		if s != want {
			t.Errorf("stream %d: istio's server saw\n %+v\nwant\n %+v", i, s, want)
		}
		select {
		case <-targetPeers:
		case <-time.After(5 * time.Second):
			t.Fatalf("stream %d: istio's server never dialed the target", i)
		}
	}
	if st := pool.Stats(); st.Handshakes != 1 || st.Streams != streams {
		t.Errorf("pool stats %+v, want %d streams over 1 handshake", st, streams)
	}
}

// TestOurClientRefusesIstioServerWithAnotherIdentity: Istio's server
// presents a valid SVID of our CA, but not the destination's; our client
// must not open the tunnel.
func TestOurClientRefusesIstioServerWithAnotherIdentity(t *testing.T) {
	p := newPKI(t)
	client := p.svid(t, "default", "client")
	impostor := p.svid(t, "default", "impostor")
	want := spiffeid.RequireFromSegments(testTD, "ns", "default", "sa", "server")
	target, _ := echoServer(t, "127.0.0.1:0")
	proxy, seen := p.istioServer(t, "127.0.0.1:0", impostor)
	pool := p.newPool(t, client)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := pool.Connect(ctx, &hbone.Request{
		Key:    hbone.Key{Src: client.ID, Dst: want, DstIP: proxy.Addr()},
		Addr:   proxy,
		Target: target,
		Body:   eofReader{},
	})
	if !errors.Is(err, hbone.ErrPeerMismatch) {
		t.Fatalf("connect to a server presenting %s: err = %v, want ErrPeerMismatch", impostor.ID, err)
	}
	select {
	case s := <-seen:
		t.Errorf("istio's server received a CONNECT it should never have seen: %+v", s)
	default:
	}
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// TestOurZtunnelTunnelsThroughIstioServer: a pod's connection captured by
// our ztunnel (outbound) crosses to Istio's HBONE server standing in for
// the destination node: our ztunnel presents the source pod's SVID,
// accepts Istio's server because it presents the destination pod's SVID,
// sends the pod's ip:port as :authority and the client pod's address in
// Forwarded; bytes and half-close make it through both ways.
func TestOurZtunnelTunnelsThroughIstioServer(t *testing.T) {
	p := newPKI(t)
	target, targetPeers := echoServer(t, netip.AddrPortFrom(ipCheckout, 0).String())
	proxy, seen := p.istioServer(t, "127.0.0.1:0", p.svid(t, "shop", "checkout"))
	z := p.ztunnel(t, ztunnelOpts{node: "node-a", outboundTo: target, hboneAddr: proxy})

	// The frontend pod connects; the capture hands the connection to the
	// ztunnel with target as its original destination.
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ipFrontend, 0))}
	c, err := d.Dial("tcp4", z.outbound.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	pod := c.LocalAddr().(*net.TCPAddr).AddrPort()
	payload := pattern(1 << 20)
	exchange(t, c, payload)
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after half-closing, the pod read %d bytes, %v; want EOF passed back through Istio's server", n, err)
	}

	s := <-seen
	want := connectSeen{
		Authority:  target.String(),
		Proto:      "HTTP/2.0",
		Forwarded:  `for="` + pod.String() + `"`,
		PeerID:     idFrontend,
		PeerAddr:   s.PeerAddr,
		ALPN:       "h2",
		TLSVersion: tls.VersionTLS13,
	}
	if s != want {
		t.Errorf("istio's server saw\n %+v\nwant\n %+v", s, want)
	}
	select {
	case <-targetPeers:
	case <-time.After(5 * time.Second):
		t.Fatal("istio's server never dialed the target")
	}
	select {
	case r := <-z.flows:
		if r.Flag != ztunnel.FlagNone || r.Direction != ztunnel.Outbound || r.Path != ztunnel.PathHBONE ||
			r.SrcID != idFrontend || r.DstID != idCheckout || r.Sent != int64(len(payload)) || r.Received != int64(len(payload)) {
			t.Errorf("flow record %+v; want an outbound hbone flow %s -> %s of %d bytes both ways", r, idFrontend, idCheckout, len(payload))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("our ztunnel never ended the flow")
	}
}

// TestOurClientWhenIstioServerCannotReachTarget: Istio's Go server sends
// its 200 before it dials the target (it flushes the response headers
// first), so a refused target cannot show up as 503. Our client must
// still end the stream promptly, without data, instead of hanging.
func TestOurClientWhenIstioServerCannotReachTarget(t *testing.T) {
	p := newPKI(t)
	client := p.svid(t, "default", "client")
	server := p.svid(t, "default", "server")
	proxy, _ := p.istioServer(t, "127.0.0.1:0", server)
	pool := p.newPool(t, client)
	closed := listen(t, "127.0.0.1:0")
	target := closed.Addr().(*net.TCPAddr).AddrPort()
	closed.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The pod sends nothing and keeps its side open.
	body, send := io.Pipe()
	cs, err := pool.Connect(ctx, &hbone.Request{
		Key:    hbone.Key{Src: client.ID, Dst: server.ID, DstIP: proxy.Addr()},
		Addr:   proxy,
		Target: target,
		Body:   body,
	})
	if err != nil {
		send.Close()
		t.Logf("connect: %v (Istio's server refused up front)", err)
		return
	}
	// The pod's side is closed first, as the ztunnel's splice does.
	defer cs.Close()
	defer send.Close()
	got, err := io.ReadAll(cs)
	if ctx.Err() != nil {
		t.Fatalf("the stream to an unreachable target stayed open for 5s (read %d bytes, %v)", len(got), err)
	}
	if len(got) != 0 {
		t.Fatalf("read %d bytes from a target that does not exist", len(got))
	}
	t.Logf("Istio's server answered 200, then ended the stream: %v", err)
}
