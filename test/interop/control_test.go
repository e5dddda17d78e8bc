package interop

import (
	"testing"

	istiohbone "istio.io/istio/pkg/hbone"
)

// TestIstioClientReachesIstioServerOverOurTLS checks the harness itself:
// Istio's client and Istio's server, both with SVIDs from our CA, tunnel
// bytes through the TLS wrapping the other tests use. If this fails, the
// failures of the mantlet tests are about the harness, not about mantlet.
func TestIstioClientReachesIstioServerOverOurTLS(t *testing.T) {
	p := newPKI(t)
	client := p.svid(t, "default", "client")
	server := p.svid(t, "default", "server")
	target, _ := echoServer(t, "127.0.0.1:0")
	proxy, seen := p.istioServer(t, "127.0.0.1:0", server)

	d := istiohbone.NewDialer(istiohbone.Config{
		ProxyAddress: proxy.String(),
		TLS:          p.istioClientTLS(client, server.ID),
	})
	c, err := d.Dial("tcp", target.String())
	if err != nil {
		t.Fatalf("istio dial via %s: %v", proxy, err)
	}
	defer c.Close()
	exchange(t, c, pattern(100_000))

	s := <-seen
	// Istio's dialer offers ALPN h2 and, dialing an IP, sends no SNI.
	if s.Authority != target.String() || s.Proto != "HTTP/2.0" || s.PeerID != client.ID || s.SNI != "" || s.ALPN != "h2" {
		t.Errorf("istio server saw %+v, want CONNECT %s over HTTP/2.0 (ALPN h2, no SNI) from %s", s, target, client.ID)
	}
}
