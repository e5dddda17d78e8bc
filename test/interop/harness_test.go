package interop

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"

	"github.com/mantlet/mantlet/identity/ca"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// Istio's hbone package logs every stream at info level to stdout;
	// keep its warnings and errors, and everything under -v.
	if !testing.Verbose() {
		istiolog.FindScope("hbone").SetOutputLevel(istiolog.WarnLevel)
	}
	os.Exit(m.Run())
}

// testTD is the trust domain of every test CA.
var testTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// pki is a CA with the helpers the tests need around it.
type pki struct {
	ca     *ca.CA
	bundle *x509bundle.Bundle
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	c, err := ca.New(testTD, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Bundle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return &pki{ca: c, bundle: b}
}

// svid mints an X509-SVID for spiffe://cluster.local/ns/<ns>/sa/<sa> the way
// a node does it: the key is made here, the CA only signs the request.
func (p *pki) svid(t *testing.T, ns, sa string) *x509svid.SVID {
	t.Helper()
	id := spiffeid.RequireFromSegments(testTD, "ns", ns, "sa", sa)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := p.ca.SignCSR(context.Background(), csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

// istioClientTLS is the TLS configuration handed to Istio's HBONE dialer:
// it presents svid and accepts only a server presenting want. Istio's
// dialer adds ALPN h2 itself and, because the proxy address is an IP,
// sends no SNI.
func (p *pki) istioClientTLS(svid *x509svid.SVID, want spiffeid.ID) *tls.Config {
	c := tlsconfig.MTLSClientConfig(svid, p.bundle, tlsconfig.AuthorizeID(want))
	c.MinVersion = tls.VersionTLS13
	return c
}

// echoServer listens on addr (an ip:0 on loopback), echoes every byte back
// and, when the peer half-closes, half-closes too. It returns the address
// it listens on and a channel that yields the remote address of every
// accepted connection.
func echoServer(t *testing.T, addr string) (netip.AddrPort, <-chan netip.AddrPort) {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	peers := make(chan netip.AddrPort, 16)
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			select {
			case peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort():
			default:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort(), peers
}

// connectSeen is what the Istio server saw of one CONNECT request.
type connectSeen struct {
	Authority string
	Proto     string
	Forwarded string
	PeerID    spiffeid.ID
	PeerAddr  string
	// SNI is the server name the client sent ("" for none), ALPN the
	// negotiated protocol, TLSVersion the negotiated version.
	SNI        string
	ALPN       string
	TLSVersion uint16
}

// istioServer runs Istio's HBONE server (pkg/hbone.NewServer) behind a
// TLS 1.3 listener on addr that presents svid, offers ALPN h2 and requires
// a client SVID from the test CA. Istio's server speaks HTTP/2 only in
// cleartext (h2c with prior knowledge), the way Istio's own tests run it;
// the listener terminates TLS and hands it the decrypted stream. Every
// CONNECT it receives is reported on the returned channel.
func (p *pki) istioServer(t *testing.T, addr string, svid *x509svid.SVID) (netip.AddrPort, <-chan connectSeen) {
	t.Helper()
	tcp, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cfg := tlsconfig.MTLSServerConfig(svid, p.bundle, tlsconfig.AuthorizeMemberOf(testTD))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{"h2"}
	l := &hideTLSListener{Listener: tls.NewListener(tcp, cfg)}

	seen := make(chan connectSeen, 16)
	srv := istiohbone.NewServer()
	istio := srv.Handler
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, tlsConnKey{}, c.(hiddenTLSConn).tls)
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tc := r.Context().Value(tlsConnKey{}).(*tls.Conn)
		s := connectSeen{Authority: r.Host, Proto: r.Proto, Forwarded: r.Header.Get("Forwarded"), PeerAddr: r.RemoteAddr}
		st := tc.ConnectionState()
		if len(st.PeerCertificates) > 0 {
			s.PeerID, _ = x509svid.IDFromCert(st.PeerCertificates[0])
		}
		s.SNI, s.ALPN, s.TLSVersion = st.ServerName, st.NegotiatedProtocol, st.Version
		select {
		case seen <- s:
		default:
		}
		istio.ServeHTTP(w, r)
	})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("istio hbone server: %v", err)
		}
	})
	return tcp.Addr().(*net.TCPAddr).AddrPort(), seen
}

type tlsConnKey struct{}

// hideTLSListener yields connections that net/http does not recognise as
// TLS (neither *tls.Conn nor anything with a ConnectionState method), so
// that it treats them as cleartext (h2c prior knowledge) while they are in
// fact TLS terminated here.
type hideTLSListener struct{ net.Listener }

// hiddenTLSConn promotes only the net.Conn methods of the TLS connection.
type hiddenTLSConn struct {
	net.Conn
	tls *tls.Conn
}

func (l *hideTLSListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return hiddenTLSConn{Conn: c, tls: c.(*tls.Conn)}, nil
}

// exchange writes payload on c, half-closes or not, and checks that the
// echo comes back byte for byte.
func exchange(t *testing.T, c net.Conn, payload []byte) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		errc <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if string(got) != string(payload) {
		t.Fatalf("echo differs from what was sent (%d bytes)", len(payload))
	}
}

// pattern returns n bytes that are not all alike, so that reordering or
// truncation shows.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}
