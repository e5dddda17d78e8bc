package hbone_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// handshakePair is an HBONE client and server configuration with their
// key exchange sets.
type handshakePair struct {
	client, server *tls.Config
}

func newHandshakePair(tb testing.TB, client, server hbone.KeyExchange) handshakePair {
	tb.Helper()
	c := ztest.NewCA(tb, "cluster.local", ca.Options{})
	cid, sid := c.ID("shop", "frontend"), c.ID("shop", "checkout")
	csvid, err := c.SVID(context.Background(), cid)
	if err != nil {
		tb.Fatal(err)
	}
	p := handshakePair{
		client: hbone.ClientConfig(csvid, c.Bundles(), sid),
		server: hbone.ServerConfig(func(ctx context.Context, _ netip.Addr) (*x509svid.SVID, error) {
			return c.SVID(ctx, sid)
		}, c.Bundles()),
	}
	if client != nil {
		p.client.CurvePreferences = client
	}
	if server != nil {
		p.server.CurvePreferences = server
	}
	return p
}

// handshake runs one handshake between p's ends over an in-memory pipe
// and returns the group they agreed on, or the client's and the server's
// errors.
func (p handshakePair) handshake() (tls.CurveID, error, error) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	// The server's certificate is chosen by its local address: a pipe has
	// none, so give it one.
	srv := tls.Server(addrConn{Conn: b}, p.server)
	errc := make(chan error, 1)
	go func() {
		err := srv.Handshake()
		if err != nil {
			b.Close()
		}
		errc <- err
	}()
	cl := tls.Client(a, p.client)
	cerr := cl.Handshake()
	if cerr != nil {
		a.Close()
	}
	serr := <-errc
	return cl.ConnectionState().CurveID, cerr, serr
}

// addrConn gives a pipe end a TCP local address.
type addrConn struct{ net.Conn }

func (addrConn) LocalAddr() net.Addr {
	return net.TCPAddrFromAddrPort(netip.MustParseAddrPort("10.0.0.1:15008"))
}

// TestKeyExchangeAgreesOnTheHybridAndFallsBack: two default ends agree on
// the post-quantum hybrid; a classical-only peer still gets X25519 with a
// default end on either side; a post-quantum-only end refuses a
// classical-only peer rather than fall back.
func TestKeyExchangeAgreesOnTheHybridAndFallsBack(t *testing.T) {
	x25519 := hbone.KeyExchange{tls.X25519}
	pqOnly := hbone.KeyExchange{tls.X25519MLKEM768}
	for _, tc := range []struct {
		name           string
		client, server hbone.KeyExchange
		want           tls.CurveID // 0: the handshake fails
	}{
		{"default both", nil, nil, tls.X25519MLKEM768},
		{"classical client, default server", x25519, nil, tls.X25519},
		{"default client, classical server", nil, x25519, tls.X25519},
		{"post-quantum only client, default server", pqOnly, nil, tls.X25519MLKEM768},
		{"classical client, post-quantum only server", x25519, pqOnly, 0},
		{"post-quantum only client, classical server", pqOnly, x25519, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, cerr, serr := newHandshakePair(t, tc.client, tc.server).handshake()
			if tc.want == 0 {
				if cerr == nil || serr == nil {
					t.Fatalf("handshake with no group in common: client error %v, server error %v; want both to fail", cerr, serr)
				}
				return
			}
			if cerr != nil || serr != nil {
				t.Fatalf("handshake: client %v, server %v", cerr, serr)
			}
			if got != tc.want {
				t.Errorf("agreed on %v, want %v", got, tc.want)
			}
		})
	}
}

func TestParseKeyExchange(t *testing.T) {
	for in, want := range map[string]string{
		"X25519MLKEM768,X25519":   "X25519MLKEM768,X25519",
		"x25519":                  "X25519",
		" X25519MLKEM768 , P256 ": "X25519MLKEM768,P256",
		"X25519,x25519":           "X25519",
	} {
		k, err := hbone.ParseKeyExchange(in)
		if err != nil || k.String() != want {
			t.Errorf("ParseKeyExchange(%q) = %v, %v; want %s", in, k, err, want)
		}
	}
	for _, in := range []string{"", "X448", "X25519,,P256", "Kyber768"} {
		if k, err := hbone.ParseKeyExchange(in); err == nil || !strings.Contains(err.Error(), "X25519MLKEM768") {
			t.Errorf("ParseKeyExchange(%q) = %v, %v; want an error that lists the groups", in, k, err)
		}
	}
	if got := hbone.DefaultTuning().KeyExchange.String(); got != "X25519MLKEM768,X25519" {
		t.Errorf("default key exchange %s, want X25519MLKEM768,X25519", got)
	}
}

// BenchmarkHandshake is one mutual TLS 1.3 handshake of HBONE (both ends,
// one process, over a pipe), per key exchange group.
func BenchmarkHandshake(b *testing.B) {
	for _, g := range []tls.CurveID{tls.X25519MLKEM768, tls.X25519} {
		b.Run(g.String(), func(b *testing.B) {
			p := newHandshakePair(b, hbone.KeyExchange{g}, hbone.KeyExchange{g})
			// The client has no session cache: each handshake is a full
			// one.
			b.ReportAllocs()
			for b.Loop() {
				got, cerr, serr := p.handshake()
				if err := errors.Join(cerr, serr); err != nil {
					b.Fatal(err)
				}
				if got != g {
					b.Fatalf("agreed on %v, want %v", got, g)
				}
			}
		})
	}
}
