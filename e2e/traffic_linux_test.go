package e2e

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// shopSpec is a two-node cluster whose "shop" namespace is meshed: a
// client and a server on node1, a server on node2.
func shopSpec() testbed.Spec {
	return testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "client", Namespace: "shop", ServiceAccount: "client"},
				{Name: "neighbour", Namespace: "shop", ServiceAccount: "neighbour"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server"},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
}

// TestMeshedPodsTalkAcrossNodesAndOnOneNode sends 8 MiB each way between
// meshed pods, to a pod of the other node (HBONE) and to a pod of the same
// node (the local path), and checks that neither application can tell it
// is meshed: the bytes arrive intact, the server sees the client pod's own
// IP (not its port: the destination ztunnel's socket has a port of its
// own), the client's peer is the address it dialled, and a half-close in
// either direction is delivered while the other direction keeps working.
func TestMeshedPodsTalkAcrossNodesAndOnOneNode(t *testing.T) {
	m := startMesh(t, shopSpec(), meshtest.Options{})
	client := m.Pod("client")
	for _, tc := range []struct {
		name, server, serverNode, path string
	}{
		{"across nodes", "server", "node2", "hbone"},
		{"on one node", "neighbour", "node1", "local"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := echo(t, m, tc.server, appPort)
			before := counters(t, m, "node1")

			c := dial(t, m, "client", srv.Addr)
			if got := netip.MustParseAddrPort(c.RemoteAddr().String()); got != srv.Addr {
				t.Errorf("client's peer (getpeername) = %s, want the address it dialled, %s", got, srv.Addr)
			}
			local := netip.MustParseAddrPort(c.LocalAddr().String())
			if local.Addr() != client.IP {
				t.Errorf("client's own address = %s, want its pod IP %s", local, client.IP)
			}
			roundTrip(t, c, randomBytes(t, 8<<20))
			// The destination ztunnel dials from the client's IP; the port
			// is its own (as with Istio's ztunnel), so only the IP is
			// compared.
			if peers := srv.Peers(); len(peers) != 1 || peers[0].Addr() != client.IP {
				t.Errorf("server saw clients %v, want one, from the client pod's own IP %s", peers, client.IP)
			}

			after := counters(t, m, "node1")
			if after.LookupOutbound != before.LookupOutbound+1 {
				t.Errorf("node1 handed %d connections to the outbound listener, want 1: the connection was not captured", after.LookupOutbound-before.LookupOutbound)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			f, err := m.WaitFlow(ctx, "node1", func(f meshtest.Flow) bool { return f.Direction == "outbound" && f.Src == local })
			if err != nil {
				t.Fatal(err)
			}
			clientID, _ := m.ID("client")
			serverID, _ := m.ID(tc.server)
			if f.Path != tc.path || f.Dst != srv.Addr || f.SrcID != clientID.String() || f.DstID != serverID.String() || f.Flag != "-" {
				t.Errorf("node1 recorded %+v; want path %s from %s to %s (%s), no error", f, tc.path, clientID, serverID, srv.Addr)
			}
			if f.Sent != 8<<20 || f.Received != 8<<20 {
				t.Errorf("node1 counted %d bytes sent and %d received, want 8 MiB each", f.Sent, f.Received)
			}
		})
		t.Run(tc.name+", the server closes first", func(t *testing.T) {
			p := m.Pod(tc.server)
			ln, err := m.Listen(context.Background(), tc.server, appPort+1)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			// The server says goodbye and half-closes at once, then
			// counts what the client still sends.
			got := make(chan int, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- -1
					return
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				_, _ = io.WriteString(c, "goodbye")
				_ = c.(*net.TCPConn).CloseWrite()
				n, _ := io.Copy(io.Discard, c)
				got <- int(n)
			}()
			before := counters(t, m, "node1")
			c := dial(t, m, "client", netip.AddrPortFrom(p.IP, appPort+1))
			if after := counters(t, m, "node1"); after.LookupOutbound != before.LookupOutbound+1 {
				t.Errorf("node1 handed %d connections to the outbound listener, want 1", after.LookupOutbound-before.LookupOutbound)
			}
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			b, err := io.ReadAll(c)
			if err != nil || string(b) != "goodbye" {
				t.Fatalf("client read %q, %v; want the server's goodbye and then its FIN", b, err)
			}
			if _, err := c.Write(randomBytes(t, 1<<20)); err != nil {
				t.Fatalf("after the server's half-close the client cannot send: %v", err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if n := <-got; n != 1<<20 {
				t.Fatalf("server received %d bytes after its half-close, want %d", n, 1<<20)
			}
		})
	}
}

// TestUnderlayCarriesOnlyTLS13ToTheDestinationPodsPort15008 watches the
// wire between the nodes while a meshed pod talks to a meshed pod of the
// other node: a marker the application sends never appears in clear, the
// only TCP on the wire goes to the destination pod's IP on port 15008 and
// starts with a TLS 1.3 handshake (ALPN h2, no SNI). TLS 1.3 encrypts the
// server's certificate, so the certificate is checked at an endpoint:
// from the client's node, with a certificate from the mesh's CA, the HBONE
// port of the destination pod presents the destination workload's SVID.
// The agents' flow logs name both identities.
func TestUnderlayCarriesOnlyTLS13ToTheDestinationPodsPort15008(t *testing.T) {
	m := startMesh(t, shopSpec(), meshtest.Options{})
	srv := echo(t, m, "server", appPort)
	server := m.Pod("server")
	marker := newMarker(t)

	stop := capture(t, m)
	c := dial(t, m, "client", srv.Addr)
	for range 3 {
		ping(t, c, marker)
	}
	roundTrip(t, c, []byte(strings.Repeat(marker, 1000)))
	pkts := stop()

	if testbed.Contains(pkts, []byte(marker)) {
		t.Fatal("the marker crossed the underlay in clear")
	}
	if s := syns(pkts, srv.Addr); len(s) > 0 {
		t.Errorf("%d connection attempts to the application port %s crossed the underlay", len(s), srv.Addr)
	}
	hbone := netip.AddrPortFrom(server.IP, meshtest.HBONEPort)
	var toServer, fromServer *testbed.Stream
	for _, s := range testbed.Streams(pkts) {
		switch {
		case s.Dst == hbone:
			toServer = &s
		case s.Src == hbone:
			fromServer = &s
		default:
			t.Errorf("unexpected TCP on the underlay: %s -> %s, %d bytes", s.Src, s.Dst, len(s.Data))
		}
	}
	if toServer == nil || fromServer == nil {
		t.Fatalf("no connection to the server pod's HBONE port %s on the underlay", hbone)
	}
	t.Logf("HBONE on the wire: %s -> %s, %d bytes each way about", toServer.Src, toServer.Dst, len(toServer.Data))
	ch, err := testbed.ParseTLSHello(toServer.Data)
	if err != nil {
		t.Fatalf("client side of %s: %v", hbone, err)
	}
	if ch.Type != testbed.TLSClientHello || !slices.Contains(ch.SupportedVersions, testbed.VersionTLS13) ||
		!slices.Equal(ch.ALPN, []string{"h2"}) || ch.ServerName != "" {
		t.Errorf("client hello = %+v; want TLS 1.3 offered, ALPN [h2], no SNI", ch)
	}
	sh, err := testbed.ParseTLSHello(fromServer.Data)
	if err != nil {
		t.Fatalf("server side of %s: %v", hbone, err)
	}
	if sh.Type != testbed.TLSServerHello || sh.Version() != testbed.VersionTLS13 || sh.PlaintextCertificate {
		t.Errorf("server hello = %+v; want TLS 1.3 chosen and no certificate in clear", sh)
	}

	// The certificate, seen from an endpoint.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	clientID, _ := m.ID("client")
	serverID, _ := m.ID("server")
	svid, err := m.IssueSVID(ctx, clientID)
	if err != nil {
		t.Fatal(err)
	}
	cfg := tlsconfig.MTLSClientConfig(svid, m.Bundle(), tlsconfig.AuthorizeAny())
	cfg.NextProtos = []string{"h2"}
	raw, err := m.Node("node1").Dial(ctx, "tcp4", hbone.String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw, cfg)
	defer tc.Close()
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatalf("TLS handshake with %s: %v", hbone, err)
	}
	st := tc.ConnectionState()
	presented, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		t.Fatal(err)
	}
	if presented != serverID || st.Version != tls.VersionTLS13 || st.NegotiatedProtocol != "h2" {
		t.Errorf("%s presented %s over %s with ALPN %q; want %s over TLS 1.3 with h2",
			hbone, presented, tls.VersionName(st.Version), st.NegotiatedProtocol, serverID)
	}

	// Both agents name both ends.
	for _, want := range []struct{ node, direction string }{{"node1", "outbound"}, {"node2", "inbound"}} {
		f, err := m.WaitFlow(ctx, want.node, func(f meshtest.Flow) bool { return f.Direction == want.direction && f.Dst == srv.Addr })
		if err != nil {
			t.Fatal(err)
		}
		if f.SrcID != clientID.String() || f.DstID != serverID.String() {
			t.Errorf("%s recorded %s -> %s, want %s -> %s", want.node, f.SrcID, f.DstID, clientID, serverID)
		}
	}
}
