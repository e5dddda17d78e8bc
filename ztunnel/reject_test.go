// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// hboneTo returns a request from a client of identity src to pod b1 on
// node-b, bound to ipA1 so node-b sees that pod's address as the peer.
func (m *mesh) hboneTo(src spiffeid.ID, target netip.AddrPort, body io.Reader) *hbone.Request {
	return &hbone.Request{
		Key:     hbone.Key{Src: src, Dst: m.id("checkout"), DstIP: ipB1},
		Addr:    netip.AddrPortFrom(ipB1, m.nodes["node-b"].hbone),
		BindSrc: ipA1,
		Target:  target,
		Body:    body,
	}
}

// pool is an HBONE client presenting svid and trusting bundles.
func pool(t *testing.T, svid *x509svid.SVID, bundles x509bundle.Source) *hbone.Pool {
	p := hbone.NewPool(hbone.PoolConfig{
		SVID:    func(context.Context, spiffeid.ID) (*x509svid.SVID, error) { return svid, nil },
		Bundles: bundles,
	})
	t.Cleanup(p.Close)
	return p
}

func mustMint(t *testing.T, c *ztest.CA, id spiffeid.ID, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	s, err := c.Mint(id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestServerRefusesBadClientCertificates(t *testing.T) {
	m := newMesh(t, meshOpts{})
	b := m.nodes["node-b"]
	evil := ztest.NewCA(t, "evil.local", ca.Options{})
	rogue := ztest.NewCA(t, "cluster.local", ca.Options{}) // same name, other keys
	trustBoth := x509bundle.NewSet(must(m.ca.Bundle(t.Context())), must(evil.Bundle(t.Context())))
	m.ca.Skew(-48 * time.Hour)
	expired := mustMint(t, m.ca, m.id("frontend"), time.Hour)
	m.ca.Skew(0)
	for _, tc := range []struct {
		name string
		svid *x509svid.SVID
		want ztunnel.ResponseFlag
	}{
		{"a client of another trust domain", mustMint(t, evil, spiffeid.RequireFromString("spiffe://evil.local/ns/shop/sa/frontend"), time.Hour), ztunnel.FlagTLSUntrustedDomain},
		{"an expired client certificate", expired, ztunnel.FlagTLSExpired},
		{"a client certificate from an unknown CA", mustMint(t, rogue, m.id("frontend"), time.Hour), ztunnel.FlagTLSUnknownCA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := b.p.Rejected(tc.want)
			_, err := pool(t, tc.svid, trustBoth).Connect(t.Context(), m.hboneTo(tc.svid.ID, m.appAddr(ipB1), strings.NewReader("x")))
			if err == nil {
				t.Fatal("CONNECT succeeded")
			}
			// The client sees the server's alert or, if the server closed
			// first, a broken connection: TLS 1.3 client authentication
			// fails after the client finished its handshake.
			b.waitCount(t, tc.want, before+1)
		})
	}
	t.Run("a client without certificate", func(t *testing.T) {
		before := b.p.Rejected(ztunnel.FlagTLSNoClientCert)
		cfg := hbone.ClientConfig(mustMint(t, m.ca, m.id("frontend"), time.Hour), m.ca.Bundles(), m.id("checkout"))
		cfg.GetClientCertificate = nil
		c, err := tls.Dial("tcp", netip.AddrPortFrom(ipB1, b.hbone).String(), cfg)
		if err == nil {
			c.Write([]byte(http2.ClientPreface))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "bad certificate") {
			t.Fatalf("err = %v, want the server's 'bad certificate' alert", err)
		}
		b.waitCount(t, ztunnel.FlagTLSNoClientCert, before+1)
	})
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// svidFunc adapts a function to ztunnel.SVIDSource.
type svidFunc func(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)

func (f svidFunc) SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	return f(ctx, id)
}

func TestClientRefusesServerOfAnotherIdentity(t *testing.T) {
	var m *mesh
	m = newMesh(t, meshOpts{svids: map[string]ztunnel.SVIDSource{
		// node-b presents admin's certificate whoever is asked for.
		"node-b": svidFunc(func(ctx context.Context, _ spiffeid.ID) (*x509svid.SVID, error) { return m.ca.SVID(ctx, m.id("admin")) }),
	}})
	c := m.mustDial(ipA1, m.appAddr(ipB1))
	got := closedRoundTrip(t, c, []byte("secret"))
	if len(got) != 0 {
		t.Fatalf("client got %q from an impostor", got)
	}
	r := m.nodes["node-a"].flow(t)
	if r.Flag != ztunnel.FlagTLSPeerMismatch || !errors.Is(r.Err, hbone.ErrPeerMismatch) {
		t.Fatalf("flow flag %s err %v, want %s", r.Flag, r.Err, ztunnel.FlagTLSPeerMismatch)
	}
	if !strings.Contains(r.Err.Error(), "got spiffe://cluster.local/ns/shop/sa/admin, want spiffe://cluster.local/ns/shop/sa/checkout") {
		t.Fatalf("error does not name both identities: %v", r.Err)
	}
}

func TestIdentityComesFromTheCertificateOnly(t *testing.T) {
	var mu sync.Mutex
	var seen []spiffeid.ID
	m := newMesh(t, meshOpts{authz: map[string]ztunnel.Authorizer{
		"node-b": ztunnel.AuthorizerFunc(func(_ context.Context, f *ztunnel.Flow) ztunnel.Verdict {
			mu.Lock()
			seen = append(seen, f.SrcID)
			mu.Unlock()
			return ztunnel.Verdict{Allow: f.SrcID.Path() == "/ns/shop/sa/admin", Policy: "shop/admin-only"}
		}),
	}})
	frontend := must(m.ca.SVID(t.Context(), m.id("frontend")))
	req := m.hboneTo(frontend.ID, m.appAddr(ipB1), strings.NewReader("x"))
	req.Header = http.Header{
		"X-Forwarded-Client-Cert": {"By=spiffe://cluster.local/ns/shop/sa/checkout;URI=spiffe://cluster.local/ns/shop/sa/admin"},
		"X-Spiffe-Id":             {"spiffe://cluster.local/ns/shop/sa/admin"},
		"Baggage":                 {"k8s.serviceaccount.name=admin"},
	}
	_, err := pool(t, frontend, m.ca.Bundles()).Connect(t.Context(), req)
	var re *hbone.RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusUnauthorized {
		t.Fatalf("err = %v, want 401", err)
	}
	m.nodes["node-b"].waitCount(t, ztunnel.FlagPolicyDenied, 1)
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen[0] != m.id("frontend") {
		t.Fatalf("authorizer saw %v, want only the certificate's frontend identity", seen)
	}
}

// rawH2 opens a mutual-TLS HTTP/2 connection to b1's HBONE port as
// frontend, and returns a framer after the preface.
func rawH2(t *testing.T, m *mesh) (*http2.Framer, net.Conn) {
	t.Helper()
	cfg := hbone.ClientConfig(must(m.ca.SVID(t.Context(), m.id("frontend"))), m.ca.Bundles(), m.id("checkout"))
	c, err := tls.Dial("tcp", netip.AddrPortFrom(ipB1, m.nodes["node-b"].hbone).String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	for { // wait for the server's SETTINGS (its frame size limit)
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := f.(*http2.SettingsFrame); ok && !s.IsAck() {
			return fr, c
		}
	}
}

// status reads frames until the response HEADERS of stream id.
func status(t *testing.T, fr *http2.Framer, id uint32) int {
	t.Helper()
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("no response: %v", err)
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == id {
			var s int
			fmt.Sscan(h.PseudoValue("status"), &s)
			return s
		}
	}
}

// goAway reads frames until GOAWAY and returns its code.
func goAway(t *testing.T, fr *http2.Framer) http2.ErrCode {
	t.Helper()
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("no GOAWAY: %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g.ErrCode
		}
	}
}

// filler returns n header fields of size bytes each.
func filler(n, size int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("x-filler-%d", i), strings.Repeat("a", size))
	}
	return out
}

func TestServerRefusesMalformedRequests(t *testing.T) {
	m := newMesh(t, meshOpts{})
	b := m.nodes["node-b"]
	frontend := must(m.ca.SVID(t.Context(), m.id("frontend")))
	header := func(fields ...string) []byte {
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for i := 0; i < len(fields); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return buf.Bytes()
	}
	target := m.appAddr(ipB1).String()
	for _, tc := range []struct {
		name       string
		block      []byte
		wantStatus int
		wantGoAway http2.ErrCode
		wantFlag   ztunnel.ResponseFlag
	}{
		{"a GET instead of CONNECT", header(":method", "GET", ":scheme", "https", ":path", "/", ":authority", target), 400, 0, ztunnel.FlagNotConnect},
		{"a CONNECT with a :path", header(":method", "CONNECT", ":authority", target, ":path", "/"), 400, 0, ztunnel.FlagMalformed},
		{"a CONNECT to a host name", header(":method", "CONNECT", ":authority", "checkout.shop.svc:80"), 400, 0, ztunnel.FlagMalformed},
		{"headers beyond 64 KiB", header(append([]string{":method", "CONNECT", ":authority", target}, filler(70, 1024)...)...), 431, 0, ztunnel.FlagHeadersTooLarge},
		{"headers beyond 64 KiB in CONTINUATION frames", header(append([]string{":method", "CONNECT", ":authority", target}, filler(100, 1024)...)...), 0, http2.ErrCodeProtocol, ztunnel.FlagMalformed},
		{"one header field beyond 64 KiB", header(":method", "CONNECT", ":authority", target, "x-filler", strings.Repeat("a", 70<<10)), 0, http2.ErrCodeCompression, ztunnel.FlagMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := b.p.Rejected(tc.wantFlag)
			fr, _ := rawH2(t, m)
			// The server allows frames of 1 MiB: one HEADERS frame, unless
			// the test wants CONTINUATION frames of 16 KiB.
			frame := len(tc.block)
			if tc.wantGoAway == http2.ErrCodeProtocol {
				frame = 16384
			}
			block, first := tc.block, true
			for first || len(block) > 0 {
				n := min(len(block), frame)
				last := n == len(block)
				if first {
					fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:n], EndHeaders: last})
				} else {
					fr.WriteContinuation(1, last, block[:n])
				}
				block, first = block[n:], false
			}
			if tc.wantGoAway != 0 {
				if code := goAway(t, fr); code != tc.wantGoAway {
					t.Fatalf("GOAWAY %v, want %v", code, tc.wantGoAway)
				}
			} else if got := status(t, fr, 1); got != tc.wantStatus {
				t.Fatalf("status %d, want %d", got, tc.wantStatus)
			}
			b.waitCount(t, tc.wantFlag, before+1)
		})
	}
	t.Run("an HTTP/1.1 CONNECT", func(t *testing.T) {
		before := b.p.Rejected(ztunnel.FlagHTTP1)
		cfg := hbone.ClientConfig(frontend, m.ca.Bundles(), m.id("checkout"))
		cfg.NextProtos = []string{"http/1.1"}
		c, err := tls.Dial("tcp", netip.AddrPortFrom(ipB1, b.hbone).String(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 400 {
			t.Fatalf("response %v, %v; want 400", resp, err)
		}
		b.waitCount(t, ztunnel.FlagHTTP1, before+1)
	})
	t.Run("a CONNECT to a pod other than the addressed one", func(t *testing.T) {
		for i, other := range []netip.AddrPort{m.appAddr(ipB2), m.appAddr(ipA2), m.appAddr(ipOutside)} {
			_, err := pool(t, frontend, m.ca.Bundles()).Connect(t.Context(), m.hboneTo(frontend.ID, other, strings.NewReader("x")))
			var re *hbone.RefusedError
			if !errors.As(err, &re) || re.Status != 400 {
				t.Fatalf("relay to %s: err %v, want 400", other, err)
			}
			b.waitCount(t, ztunnel.FlagRelayRefused, uint64(i+1))
		}
	})
}

func TestForwardedIsBelievedOnlyForTheCallersOwnWorkloads(t *testing.T) {
	m := newMesh(t, meshOpts{})
	b := m.nodes["node-b"]
	frontend := must(m.ca.SVID(t.Context(), m.id("frontend")))
	p := pool(t, frontend, m.ca.Bundles())
	for _, tc := range []struct {
		name      string
		forwarded netip.AddrPort
		spoofed   bool
	}{
		{"the caller's own pod", netip.AddrPortFrom(ipA1, 4242), false},
		{"a pod of another identity", netip.AddrPortFrom(ipA2, 4242), true},
		{"an address outside the mesh", netip.AddrPortFrom(ipOutside, 4242), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := b.p.Rejected(ztunnel.FlagForwardedSpoofed)
			req := m.hboneTo(frontend.ID, m.appAddr(ipB1), strings.NewReader("hi"))
			req.Forwarded = tc.forwarded
			cs, err := p.Connect(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(cs)
			cs.Close()
			if string(got) != "hi" {
				t.Fatalf("echo %q", got)
			}
			r := b.flow(t)
			if tc.spoofed {
				if r.Src.Addr() != ipA1 || r.Src.Port() == 4242 {
					t.Fatalf("flow source %s, want the TLS peer's address", r.Src)
				}
				b.waitCount(t, ztunnel.FlagForwardedSpoofed, before+1)
			} else if r.Src != tc.forwarded || b.p.Rejected(ztunnel.FlagForwardedSpoofed) != before {
				t.Fatalf("flow source %s, want the forwarded %s", r.Src, tc.forwarded)
			}
		})
	}
}

func TestOutboundRefusals(t *testing.T) {
	closedPort := func() uint16 {
		ln := listen(t)
		p := port(ln)
		ln.Close()
		return p
	}()
	denyAll := ztunnel.AuthorizerFunc(func(context.Context, *ztunnel.Flow) ztunnel.Verdict {
		return ztunnel.Verdict{Policy: "shop/deny-all"}
	})
	m := newMesh(t, meshOpts{authz: map[string]ztunnel.Authorizer{"node-b": ztunnel.AuthorizerFunc(
		func(ctx context.Context, f *ztunnel.Flow) ztunnel.Verdict {
			if f.Dst.Name == "admin-0" {
				return denyAll(ctx, f)
			}
			return ztunnel.Verdict{Allow: true}
		})}})
	a, b := m.nodes["node-a"], m.nodes["node-b"]
	for _, tc := range []struct {
		name           string
		src            netip.Addr
		dst            netip.AddrPort
		wantA, wantB   ztunnel.ResponseFlag
		wantBRecorded  bool
		wantErrContain string
		// node-a's record says the destination denied the flow (after the
		// pre-check admitted it).
		wantADenied bool
	}{
		{"policy at the destination denies", ipA1, m.appAddr(ipB2), ztunnel.FlagHBONERefused, ztunnel.FlagPolicyDenied, true, "401", true},
		{"the destination port is closed", ipA1, netip.AddrPortFrom(ipB1, closedPort), ztunnel.FlagHBONERefused, ztunnel.FlagConnectFailed, true, "503", false},
		{"the destination is the ztunnel's own port", ipA1, netip.AddrPortFrom(ipB1, m.nodes["node-a"].out), ztunnel.FlagLoop, 0, false, "own port", false},
		{"the source is no local workload", netip.MustParseAddr("127.0.1.99"), m.appAddr(ipB1), ztunnel.FlagUnknownSource, 0, false, "no enrolled workload", false},
		{"the source is a workload of another node", ipB2, m.appAddr(ipB1), ztunnel.FlagUnknownSource, 0, false, "no enrolled workload", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Dial through node-a whatever the source, as a capture bug would.
			n := a
			c, err := bindDialer(tc.src).Dial("tcp4", netip.AddrPortFrom(tc.dst.Addr(), n.out).String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			n.orig.Store(c.LocalAddr().(*net.TCPAddr).AddrPort(), tc.dst)
			if got := closedRoundTrip(t, c.(*net.TCPConn), []byte("x")); len(got) != 0 {
				t.Fatalf("got %q, want the connection closed", got)
			}
			r := a.flow(t)
			if r.Flag != tc.wantA || r.Err == nil || !strings.Contains(r.Err.Error(), tc.wantErrContain) {
				t.Fatalf("node-a flow: flag %s err %v; want %s and %q", r.Flag, r.Err, tc.wantA, tc.wantErrContain)
			}
			denied := ztunnel.Verdict{Flag: ztunnel.FlagHBONERefused, Rule: -1, Reason: ztunnel.ReasonDeniedByDestination}
			if got := r.Verdict == denied && r.Admitted.Allow; got != tc.wantADenied {
				t.Fatalf("node-a flow: verdict %+v admitted %+v; want denied by the destination: %v", r.Verdict, r.Admitted, tc.wantADenied)
			}
			if tc.wantBRecorded {
				if rb := b.flow(t); rb.Flag != tc.wantB {
					t.Fatalf("node-b flow: flag %s err %v; want %s", rb.Flag, rb.Err, tc.wantB)
				}
			}
		})
	}
}

// closedRoundTrip is roundTrip for connections the ztunnel refuses: they
// are accepted, then reset, never closed in order (the kernel reports the
// reset once, to the write or to the read, whichever comes first).
func closedRoundTrip(t *testing.T, c *net.TCPConn, data []byte) []byte {
	t.Helper()
	_, werr := c.Write(data)
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, rerr := io.ReadAll(c)
	if !errors.Is(werr, syscall.ECONNRESET) && !errors.Is(rerr, syscall.ECONNRESET) {
		t.Fatalf("write: %v, read: %v; want the connection reset", werr, rerr)
	}
	return got
}
