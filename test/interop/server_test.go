package interop

import (
	"crypto/tls"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/mantlet/mantlet/ztunnel"
)

var (
	idFrontend = spiffeid.RequireFromSegments(testTD, "ns", "shop", "sa", "frontend")
	idCheckout = spiffeid.RequireFromSegments(testTD, "ns", "shop", "sa", "checkout")
)

// TestIstioClientTunnelsThroughOurZtunnel: Istio's HBONE dialer, with an
// SVID of our CA, reaches a pod through our ztunnel's HBONE port. Our
// ztunnel presents the destination pod's SVID (Istio's client accepts
// only that one), authenticates the caller from its certificate, sees the
// target as the CONNECT :authority, and splices to the pod; bytes arrive
// intact both ways.
func TestIstioClientTunnelsThroughOurZtunnel(t *testing.T) {
	p := newPKI(t)
	target, targetPeers := echoServer(t, netip.AddrPortFrom(ipCheckout, 0).String())
	authz := newFlowRecorder(true)
	z := p.ztunnel(t, ztunnelOpts{node: "node-b", authz: authz, hbone: netip.AddrPortFrom(ipCheckout, 0).String()})
	client := p.svid(t, "shop", "frontend")

	d := istiohbone.NewDialer(istiohbone.Config{
		ProxyAddress: z.hbone.String(),
		TLS:          p.istioClientTLS(client, idCheckout),
	})
	c, err := d.Dial("tcp", target.String())
	if err != nil {
		t.Fatalf("istio dial %s via our ztunnel at %s: %v", target, z.hbone, err)
	}
	payload := pattern(1 << 20)
	exchange(t, c, payload)
	c.Close()

	f := <-authz.flows
	if f.SrcID != idFrontend || f.DstAddr != target || !f.MTLS {
		t.Errorf("our ztunnel authorized {SrcID:%s DstAddr:%s MTLS:%v}, want {%s %s true}", f.SrcID, f.DstAddr, f.MTLS, idFrontend, target)
	}
	select {
	case <-targetPeers:
	case <-time.After(5 * time.Second):
		t.Fatal("the target pod was never dialed")
	}
	select {
	case r := <-z.flows:
		if r.Flag != ztunnel.FlagNone || r.Path != ztunnel.PathHBONE || r.DstID != idCheckout ||
			r.Sent != int64(len(payload)) || r.Received != int64(len(payload)) {
			t.Errorf("flow record: flag %s path %s dst_id %s sent %d received %d; want -, hbone, %s, %d both ways",
				r.Flag, r.Path, r.DstID, r.Sent, r.Received, idCheckout, len(payload))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("our ztunnel never ended the flow after Istio's client closed")
	}
}

// TestIstioClientSeesOurRefusals: every way our ztunnel refuses Istio's
// client reaches Istio's dialer as an error a user can read, is counted
// under its response flag, and never reaches the pod.
func TestIstioClientSeesOurRefusals(t *testing.T) {
	p := newPKI(t)
	// A port on the checkout pod's IP that nobody listens on.
	closed := listen(t, netip.AddrPortFrom(ipCheckout, 0).String())
	closedAddr := closed.Addr().String()
	closed.Close()

	for _, tc := range []struct {
		name     string
		noCert   bool
		deny     bool
		target   string // "" is the echo server
		wantErr  string // a part of the dial error ("": any error)
		wantFlag ztunnel.ResponseFlag
	}{
		// In TLS 1.3 the client finishes its handshake before the server
		// checks the client certificate, so what Istio's dialer reports
		// depends on timing: the server's alert ("remote error: tls: bad
		// certificate"), a broken pipe, or "client conn could not be
		// established". Only the failure and the count are checked.
		{name: "a client without a certificate", noCert: true, wantErr: "", wantFlag: ztunnel.FlagTLSNoClientCert},
		{name: "a target other than the addressed pod", target: "127.0.0.1:9", wantErr: "400 Bad Request", wantFlag: ztunnel.FlagRelayRefused},
		{name: "a target that is not ip:port", target: "checkout.shop:80", wantErr: "400 Bad Request", wantFlag: ztunnel.FlagMalformed},
		{name: "a flow the policy denies", deny: true, wantErr: "401 Unauthorized", wantFlag: ztunnel.FlagPolicyDenied},
		{name: "a pod port nobody listens on", target: closedAddr, wantErr: "503 Service Unavailable", wantFlag: ztunnel.FlagConnectFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			echo, targetPeers := echoServer(t, netip.AddrPortFrom(ipCheckout, 0).String())
			target := tc.target
			if target == "" {
				target = echo.String()
			}
			z := p.ztunnel(t, ztunnelOpts{node: "node-b", authz: newFlowRecorder(!tc.deny), hbone: netip.AddrPortFrom(ipCheckout, 0).String()})
			var cfg *tls.Config
			if tc.noCert {
				cfg = tlsconfig.TLSClientConfig(p.bundle, tlsconfig.AuthorizeID(idCheckout))
				cfg.MinVersion = tls.VersionTLS13
			} else {
				cfg = p.istioClientTLS(p.svid(t, "shop", "frontend"), idCheckout)
			}
			d := istiohbone.NewDialer(istiohbone.Config{ProxyAddress: z.hbone.String(), TLS: cfg})

			c, err := d.Dial("tcp", target)
			if err == nil {
				c.Close()
				t.Fatalf("istio dial %s: no error, want one containing %q", target, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("istio dial %s: %v, want an error containing %q", target, err, tc.wantErr)
			}
			// The count may land just after the client saw the refusal.
			deadline := time.Now().Add(5 * time.Second)
			for z.Rejected(tc.wantFlag) == 0 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if n := z.Rejected(tc.wantFlag); n != 1 {
				t.Errorf("counted %d refusals as %s, want 1 (all counters: %v)", n, tc.wantFlag, z.Counters())
			}
			select {
			case peer := <-targetPeers:
				t.Errorf("the pod received a connection from %s", peer)
			default:
			}
		})
	}
}
