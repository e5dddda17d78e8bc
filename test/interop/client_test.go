package interop

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

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
// target as :authority and our Forwarded header, and several streams share
// one TLS connection.
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
			Authority: target.String(),
			Proto:     "HTTP/2.0",
			Forwarded: `for="198.19.1.7:40123"`,
			PeerID:    client.ID,
			PeerAddr:  s.PeerAddr,
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
