package interop

import (
	"io"
	"net/http"
	"net/netip"
	"testing"
	"time"
)

// TestOurZtunnelTakesIstioZtunnelHeaders: Istio's Go dialer sends no
// headers, but Istio's production ztunnel sends, on every CONNECT,
// Forwarded with a quoted ip:port and, for service traffic, a host
// parameter, plus W3C baggage and traceparent. A request shaped like that
// (sent here with Go's HTTP/2 client) goes
// through our ztunnel, which believes the Forwarded address because it
// belongs to a workload with the caller's identity.
func TestOurZtunnelTakesIstioZtunnelHeaders(t *testing.T) {
	p := newPKI(t)
	target, _ := echoServer(t, netip.AddrPortFrom(ipCheckout, 0).String())
	authz := newFlowRecorder(true)
	z := p.ztunnel(t, ztunnelOpts{node: "node-b", authz: authz, hbone: netip.AddrPortFrom(ipCheckout, 0).String()})
	h2 := new(http.Protocols)
	h2.SetHTTP2(true)
	tr := &http.Transport{Protocols: h2, TLSClientConfig: p.istioClientTLS(p.svid(t, "shop", "frontend"), idCheckout)}
	t.Cleanup(tr.CloseIdleConnections)

	body, send := io.Pipe()
	req, err := http.NewRequest(http.MethodConnect, "https://"+z.hbone.String(), body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = target.String()
	req.Header.Set("Forwarded", `for="127.0.1.1:41000";host=checkout.shop.svc.cluster.local`)
	req.Header.Set("Baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=frontend,service.name=frontend,service.version=v1")
	req.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("CONNECT %s via our ztunnel: %v", target, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s: %s, want 200", target, resp.Status)
	}
	payload := pattern(256 << 10)
	go func() {
		_, _ = send.Write(payload)
		_ = send.Close()
	}()
	got, err := io.ReadAll(resp.Body)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("read %d of %d bytes back, error %v", len(got), len(payload), err)
	}

	select {
	case f := <-authz.flows:
		want := netip.MustParseAddrPort("127.0.1.1:41000")
		if f.SrcAddr != want || f.Src == nil || f.Src.Name != "frontend-0" || f.SrcID != idFrontend {
			t.Errorf("our ztunnel authorized source %s (workload %v, id %s); want the Forwarded %s of frontend-0, %s",
				f.SrcAddr, f.Src, f.SrcID, want, idFrontend)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("our ztunnel never authorized the flow")
	}
}
