package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

func printFlows(w io.Writer, flows []meshtest.Flow) {
	if len(flows) == 0 {
		fmt.Fprintln(w, "  (none)")
		return
	}
	for _, f := range flows {
		fmt.Fprintf(w, "  %s  %s %s  %s -> %s  sent %s, received %s", f.Node, f.Direction, f.Path, f.Src, f.Dst, report.Bytes(f.Sent), report.Bytes(f.Received))
		if f.Flag != "" && f.Flag != "-" {
			fmt.Fprintf(w, "  refused: %s", f.Flag)
		}
		fmt.Fprintln(w)
		fmt.Fprintf(w, "         %s -> %s\n", orNone(f.SrcID), orNone(f.DstID))
	}
}

func orNone(s string) string {
	if s == "" {
		return "(no identity)"
	}
	return s
}

// captured sums the counters that move when a connection is captured.
func captured(c bpf.Counters) uint64 {
	return c.Redirected + c.UplinkRedirected + c.LookupOutbound + c.LookupHBONE + c.LookupInboundPlain
}

func checkDemo(c *report.Checks, m *meshtest.Mesh, r *demoResult) {
	clientID, _ := m.ID(r.client.Name)
	serverID, _ := m.ID(r.server.Name)
	meshAddr := netip.AddrPortFrom(r.server.IP, demoPort)
	plainAddr := netip.AddrPortFrom(r.plainServer.IP, demoPort)

	// 1. The application sees nothing unusual.
	c.Check(len(r.meshPeers) == 1 && r.meshPeers[0].Addr() == r.client.IP,
		"the meshed server saw the client pod's own IP (peer %s), not a proxy's", peersString(r.meshPeers))

	// 2. The ztunnels carried the meshed connection, with both identities.
	var out, in *meshtest.Flow
	for i, f := range r.flows {
		if f.Dst != meshAddr || f.Src.Addr() != r.client.IP || f.Flag != "-" {
			continue
		}
		switch {
		case f.Node == r.client.Node && f.Direction == "outbound" && f.Path == "hbone":
			out = &r.flows[i]
		case f.Node == r.server.Node && f.Direction == "inbound" && f.Path == "hbone":
			in = &r.flows[i]
		}
	}
	c.Check(out != nil && in != nil, "the connection was captured on %s (outbound) and carried over HBONE to %s (inbound)%s",
		r.client.Node, r.server.Node, errSuffix(r.flowErr))
	c.Check(out != nil && in != nil && out.SrcID == clientID.String() && in.SrcID == clientID.String() &&
		out.DstID == serverID.String() && in.DstID == serverID.String(),
		"identities on both ends: client %s, server %s (the server learned the client's from its certificate)", clientID, serverID)
	c.Check(in != nil && in.Sent == r.meshExchanged && in.Received == r.meshExchanged,
		"every byte went through the tunnel: %s each way", report.Bytes(r.meshExchanged))
	c.Check(r.between[r.client.Node].LookupOutbound > r.before[r.client.Node].LookupOutbound &&
		r.between[r.server.Node].LookupHBONE > r.before[r.server.Node].LookupHBONE,
		"eBPF counters moved: %s handed %d connection(s) to the outbound listener, %s %d to the HBONE listener",
		r.client.Node, r.between[r.client.Node].LookupOutbound-r.before[r.client.Node].LookupOutbound,
		r.server.Node, r.between[r.server.Node].LookupHBONE-r.before[r.server.Node].LookupHBONE)

	src := istioOpened(r.metrics[r.client.Node], "source", clientID.String(), serverID.String())
	dst := istioOpened(r.metrics[r.server.Node], "destination", clientID.String(), serverID.String())
	c.Check(src != nil && dst != nil && src.Labels["connection_security_policy"] == "mutual_tls" && dst.Labels["connection_security_policy"] == "mutual_tls",
		"Istio's metrics count it on both ends: istio_tcp_connections_opened_total, reporter source on %s and destination on %s, connection_security_policy mutual_tls",
		r.client.Node, r.server.Node)

	// 3. The wire between the nodes.
	var meshPkts, plainPkts []testbed.Packet
	var meshBytes, allBytes int64
	stray := 0
	plainIPs := []netip.Addr{r.plainClient.IP, r.plainServer.IP}
	for _, p := range r.packets {
		allBytes += int64(len(p.Payload))
		if p.Proto != testbed.ProtoTCP {
			continue
		}
		if slices.Contains(plainIPs, p.Src.Addr()) || slices.Contains(plainIPs, p.Dst.Addr()) {
			plainPkts = append(plainPkts, p)
			continue
		}
		meshPkts = append(meshPkts, p)
		meshBytes += int64(len(p.Payload))
		if p.Src.Port() != meshtest.HBONEPort && p.Dst.Port() != meshtest.HBONEPort {
			stray++
		}
	}
	lost := ""
	if r.captureErr != nil {
		lost = " (" + r.captureErr.Error() + ")"
	}
	c.Check(r.captureErr == nil, "the capture on the underlay bridge is complete: %d packets, %s of payload, none lost%s",
		len(r.packets), report.Bytes(allBytes), lost)
	c.Check(len(meshPkts) > 0 && stray == 0,
		"meshed traffic on the wire: %d TCP packets (%s of payload), every one to or from port %d (%d on another port)",
		len(meshPkts), report.Bytes(meshBytes), meshtest.HBONEPort, stray)
	ok, text := tlsCheck(meshPkts, r.server.IP)
	c.Check(ok, "%s", text)
	c.Check(len(r.packets) > 0 && !testbed.Contains(r.packets, []byte(r.meshMarker)),
		"the meshed marker %q appears nowhere in clear (searched %d packets and their reassembled streams)", r.meshMarker, len(r.packets))

	// 4. Unmeshed traffic is left alone.
	plainSeen := testbed.Contains(plainPkts, []byte(r.plainMarker))
	direct := false
	for _, s := range testbed.Streams(plainPkts) {
		if s.Src.Addr() == r.plainClient.IP && s.Dst == plainAddr {
			direct = true
		}
	}
	c.Check(plainSeen && direct, "unmeshed traffic left alone: marker %q visible in plaintext, %s -> %s directly (as expected without the mesh)",
		r.plainMarker, r.plainClient.IP, plainAddr)
	plainFlows := 0
	for _, f := range r.flows {
		if f.Dst.Addr() == r.plainServer.IP || f.Src.Addr() == r.plainClient.IP {
			plainFlows++
		}
	}
	moved := uint64(0)
	for node := range r.after {
		moved += captured(r.after[node]) - captured(r.between[node])
	}
	plainSeries := 0
	for _, ms := range r.metrics {
		for name := range ms {
			if !strings.HasPrefix(name, "istio_") {
				continue
			}
			for _, s := range ms.Series(name, nil) {
				if s.Labels["source_workload"] == r.plainClient.Name || s.Labels["destination_workload"] == r.plainServer.Name {
					plainSeries++
				}
			}
		}
	}
	c.Check(plainFlows == 0 && moved == 0 && plainSeries == 0 && len(r.plainPeers) == 1 && r.plainPeers[0].Addr() == r.plainClient.IP,
		"no ztunnel saw it: %d flows recorded, %d Istio metric series, capture counters moved by %d", plainFlows, plainSeries, moved)
}

// tlsCheck checks the HBONE connection's handshake as seen on the wire and
// returns the outcome and what it says.
func tlsCheck(pkts []testbed.Packet, server netip.Addr) (bool, string) {
	hbone := netip.AddrPortFrom(server, meshtest.HBONEPort)
	var ch, sh *testbed.TLSHello
	var from netip.AddrPort
	var errs []error
	for _, s := range testbed.Streams(pkts) {
		switch {
		case s.Dst == hbone && ch == nil:
			h, err := testbed.ParseTLSHello(s.Data)
			if err != nil {
				errs = append(errs, fmt.Errorf("client side: %w", err))
				continue
			}
			ch, from = h, s.Src
		case s.Src == hbone && sh == nil:
			h, err := testbed.ParseTLSHello(s.Data)
			if err != nil {
				errs = append(errs, fmt.Errorf("server side: %w", err))
				continue
			}
			sh = h
		}
	}
	ok := ch != nil && sh != nil && ch.Type == testbed.TLSClientHello && sh.Type == testbed.TLSServerHello &&
		ch.Version() == testbed.VersionTLS13 && sh.Version() == testbed.VersionTLS13 &&
		ch.ServerName == "" && slices.Contains(ch.ALPN, "h2") && !sh.PlaintextCertificate
	detail := ""
	switch {
	case ch == nil || sh == nil:
		detail = fmt.Sprintf(" (no complete handshake to %s found: %v)", hbone, errors.Join(errs...))
	case !ok:
		detail = fmt.Sprintf(" (client offered %#04x, SNI %q, ALPN %q; server chose %#04x, certificate in clear: %v)",
			ch.Version(), ch.ServerName, ch.ALPN, sh.Version(), sh.PlaintextCertificate)
	}
	return ok, fmt.Sprintf("it is TLS 1.3 from %s to the destination pod %s: client hello with ALPN h2 and no SNI, server hello chose TLS 1.3, certificates encrypted%s", from, hbone, detail)
}

func peersString(ps []netip.AddrPort) string {
	if len(ps) == 0 {
		return "no connection"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}

// demoMetrics scrapes every node's agent.
func demoMetrics(ctx context.Context, m *meshtest.Mesh) (map[string]meshtest.Metrics, error) {
	out := map[string]meshtest.Metrics{}
	for _, n := range m.TB.Nodes() {
		ms, err := m.Metrics(ctx, n.Name)
		if err != nil {
			return nil, err
		}
		out[n.Name] = ms
	}
	return out, nil
}

// istioOpened returns a node's istio_tcp_connections_opened_total series
// of the meshed connection, as reporter saw it, if it counted one.
func istioOpened(ms meshtest.Metrics, reporter, src, dst string) *meshtest.Series {
	for _, s := range ms.Series("istio_tcp_connections_opened_total", map[string]string{
		"reporter": reporter, "source_principal": src, "destination_principal": dst,
	}) {
		if s.Value > 0 {
			return &s
		}
	}
	return nil
}

// demoShown are the series the report shows of each node's other
// metrics, and which of their labels.
var demoShown = []struct {
	name  string
	match map[string]string
	keys  []string
}{
	{"mantlet_agent_ready", nil, nil},
	{"mantlet_datapath_packets_total", map[string]string{"event": "lookup_hbone"}, []string{"event"}},
	{"mantlet_datapath_packets_total", map[string]string{"event": "lookup_outbound"}, []string{"event"}},
	{"mantlet_hbone_pool_handshakes_total", nil, nil},
}

func printDemoMetrics(w io.Writer, m *meshtest.Mesh, r *demoResult) {
	clientID, _ := m.ID(r.client.Name)
	serverID, _ := m.ID(r.server.Name)
	for _, n := range m.TB.Nodes() {
		fmt.Fprintf(w, "  %s:  nsenter --net=%s curl -s http://127.0.0.1:%d/metrics\n", n.Name, n.NS, meshtest.MetricsPort)
		reporter := "source"
		if n.Name == r.server.Node {
			reporter = "destination"
		}
		if s := istioOpened(r.metrics[n.Name], reporter, clientID.String(), serverID.String()); s != nil {
			fmt.Fprintf(w, "    %s  (other labels left out)\n", s.Format("reporter", "source_principal", "destination_principal", "connection_security_policy"))
		}
		for _, shown := range demoShown {
			for _, s := range r.metrics[n.Name].Series(shown.name, shown.match) {
				fmt.Fprintf(w, "    %s\n", s.Format(shown.keys...))
			}
		}
	}
}
