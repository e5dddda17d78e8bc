// Addresses of 127.0.0.0/8 other than 127.0.0.1 are on loopback on Linux.

//go:build linux

package telemetry

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
)

type noSVIDs struct{}

func (noSVIDs) SVID(context.Context, spiffeid.ID) (*x509svid.SVID, error) {
	return nil, errors.New("no SVIDs in this test")
}
func (noSVIDs) GetX509BundleForTrustDomain(spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return nil, errors.New("no bundles in this test")
}

// origConn makes an accepted connection look captured: its LocalAddr is
// the original destination.
type origConn struct {
	*net.TCPConn
	dst net.Addr
}

func (c origConn) LocalAddr() net.Addr { return c.dst }

// TestObserverOnALiveProxy runs a same-node flow through a real ztunnel
// and checks the byte counters move while the flow is open, and that the
// close adds only the rest.
func TestObserverOnALiveProxy(t *testing.T) {
	cli, srv := netip.MustParseAddr("127.0.5.1"), netip.MustParseAddr("127.0.5.2")
	snap, err := workload.New([]workload.Node{{Name: "n1", IP: netip.MustParseAddr("127.0.5.100")}}, []workload.Workload{
		{UID: "c", Name: "client-0", Namespace: "shop", ServiceAccount: "client", Node: "n1", IPs: []netip.Addr{cli}, Enrolled: true},
		{UID: "s", Name: "server-0", Namespace: "shop", ServiceAccount: "server", Node: "n1", IPs: []netip.Addr{srv}, Enrolled: true},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := workload.NewStore()
	store.Replace(snap)

	// The destination application echoes.
	app, err := net.Listen("tcp4", netip.AddrPortFrom(srv, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
				c.Close()
			}()
		}
	}()

	o := NewObserver(ObserverOptions{Flows: NewFlowLog(16)})
	ended := make(chan *ztunnel.FlowRecord, 1)
	p, err := ztunnel.New(ztunnel.Config{NodeName: "n1", TrustDomain: identity.DefaultTrustDomain, Store: store, SVIDs: noSVIDs{}, Bundles: noSVIDs{},
		OnFlowOpen: o.FlowOpened,
		OnFlowEnd:  func(r *ztunnel.FlowRecord) { o.FlowEnded(r); ended <- r },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)

	// The "capture": the client connects to a listener whose accepted conn
	// claims the application's address as its original destination.
	capture, err := net.Listen("tcp4", "127.0.5.100:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { capture.Close() })
	go func() {
		c, err := capture.Accept()
		if err != nil {
			return
		}
		p.HandleOutbound(context.Background(), origConn{c.(*net.TCPConn), app.Addr()})
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: cli.AsSlice()}}
	c, err := d.Dial("tcp4", capture.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	echo := func(n int) {
		t.Helper()
		if _, err := c.Write([]byte(strings.Repeat("x", n))); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(o.Collectors()...)
	const both = `connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/server",destination_service="unknown",destination_workload="server-0",destination_workload_namespace="shop",reporter="%s",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_workload="client-0",source_workload_namespace="shop"`
	series := func(name string, v int) string {
		return name + "{" + strings.ReplaceAll(both, "%s", "destination") + "} " + strconv.Itoa(v) + "\n" +
			name + "{" + strings.ReplaceAll(both, "%s", "source") + "} " + strconv.Itoa(v) + "\n"
	}

	echo(1000)
	// Bytes are counted as they move: wait for the splice to account for
	// them, then flush as the periodic flusher would.
	deadline := time.Now().Add(5 * time.Second)
	for {
		o.Flush(p)
		// Both directions: the echo can reach the client before the
		// splice has added the request's bytes.
		if testutil.ToFloat64(o.Traffic.sent.WithLabelValues(sourceLabels("source")...)) == 1000 &&
			testutil.ToFloat64(o.Traffic.received.WithLabelValues(sourceLabels("source")...)) == 1000 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	compare(t, reg, series("istio_tcp_connections_opened_total", 1)+
		series("istio_tcp_received_bytes_total", 1000)+series("istio_tcp_sent_bytes_total", 1000), trafficNames...)

	echo(500)
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
	r := <-ended
	if r.Sent != 1500 || r.Received != 1500 {
		t.Fatalf("flow record: sent %d, received %d", r.Sent, r.Received)
	}
	o.Flush(p) // nothing open: nothing added
	compare(t, reg, series("istio_tcp_connections_closed_total", 1)+series("istio_tcp_connections_opened_total", 1)+
		series("istio_tcp_received_bytes_total", 1500)+series("istio_tcp_sent_bytes_total", 1500), trafficNames...)

	evs := o.opts.Flows.Recent(FlowFilter{}, 0)
	if len(evs) != 2 || evs[0].Event != events.Open || evs[1].Event != events.Close || evs[0].ID != evs[1].ID || evs[1].BytesSent != 1500 {
		t.Errorf("flow log = %+v, want open then close of one flow", evs)
	}
}

func sourceLabels(reporter string) []string {
	return []string{reporter, "client-0", "shop", "spiffe://cluster.local/ns/shop/sa/client", "server-0", "shop",
		"spiffe://cluster.local/ns/shop/sa/server", "unknown", "mutual_tls", "-"}
}
