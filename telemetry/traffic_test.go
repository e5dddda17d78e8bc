package telemetry

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	frontend = &workload.Workload{UID: "f", Name: "frontend-7d9f-abcde", Namespace: "shop", ServiceAccount: "frontend",
		Labels: map[string]string{"app": "frontend"}, Node: "node-a", IPs: []netip.Addr{netip.MustParseAddr("198.19.1.10")}, Enrolled: true}
	payments = &workload.Workload{UID: "p", Name: "payments-0", Namespace: "shop", ServiceAccount: "payments",
		Node: "node-b", IPs: []netip.Addr{netip.MustParseAddr("198.19.2.10")}, Enrolled: true}
	paymentsSvc = &workload.Service{Name: "payments", Namespace: "shop"}
)

func id(w *workload.Workload) spiffeid.ID {
	i, err := w.ID(td)
	if err != nil {
		panic(err)
	}
	return i
}

// hboneOut is an outbound HBONE flow frontend → payments through the
// payments service.
func hboneOut(flowID uint64) *ztunnel.FlowRecord {
	return &ztunnel.FlowRecord{
		ID: flowID, Direction: ztunnel.Outbound, Path: ztunnel.PathHBONE,
		Src: netip.MustParseAddrPort("198.19.1.10:40000"), Dst: netip.MustParseAddrPort("198.19.2.10:8443"),
		SrcID: id(frontend), DstID: id(payments), SrcWorkload: frontend, DstWorkload: payments, Service: paymentsSvc,
		MTLS: true, Verdict: ztunnel.Verdict{Allow: true},
	}
}

const trafficHelp = `
# HELP istio_tcp_connections_closed_total TCP connections closed, by response flag.
# TYPE istio_tcp_connections_closed_total counter
# HELP istio_tcp_connections_failed_total TCP connections that were refused or ended badly (closed with a response flag other than "-").
# TYPE istio_tcp_connections_failed_total counter
# HELP istio_tcp_connections_opened_total TCP connections opened.
# TYPE istio_tcp_connections_opened_total counter
# HELP istio_tcp_received_bytes_total Bytes received by the destination: sent by the client (request direction), counted while connections are open.
# TYPE istio_tcp_received_bytes_total counter
# HELP istio_tcp_sent_bytes_total Bytes sent by the destination back to the client (response direction), counted while connections are open.
# TYPE istio_tcp_sent_bytes_total counter
`

var trafficNames = []string{"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
	"istio_tcp_connections_failed_total", "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"}

// compare checks the whole exposition of names against want (HELP and
// TYPE lines are added).
func compare(t *testing.T, reg *prometheus.Registry, want string, names ...string) {
	t.Helper()
	if err := testutil.GatherAndCompare(reg, strings.NewReader(trafficHelp+want), names...); err != nil {
		t.Fatal(err)
	}
}

func TestTrafficCountsBytesWhileOpenAndEachByteOnce(t *testing.T) {
	tr := NewTraffic()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(tr)
	const labels = `connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="payments.shop.svc.cluster.local",destination_workload="payments-0",destination_workload_namespace="shop",reporter="source",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/frontend",source_workload="frontend",source_workload_namespace="shop"`

	r := hboneOut(7)
	tr.Opened(r)
	tr.Flush(7, 1000, 10)
	tr.Flush(7, 1500, 10) // only the growth counts
	compare(t, reg, `
istio_tcp_connections_opened_total{`+labels+`} 1
istio_tcp_received_bytes_total{`+labels+`} 1500
istio_tcp_sent_bytes_total{`+labels+`} 10
`, trafficNames...)

	r.Sent, r.Received = 2000, 30
	tr.Closed(r)
	tr.Flush(7, 5000, 500) // a late flush of a closed flow counts nothing
	compare(t, reg, `
istio_tcp_connections_closed_total{`+labels+`} 1
istio_tcp_connections_opened_total{`+labels+`} 1
istio_tcp_received_bytes_total{`+labels+`} 2000
istio_tcp_sent_bytes_total{`+labels+`} 30
`, trafficNames...)
	if n := tr.OpenFlows(); n != 0 {
		t.Errorf("%d flows still tracked after close", n)
	}
}

func TestTrafficLabelsByPathAndOutcome(t *testing.T) {
	local := hboneOut(1)
	local.Path, local.Service = ztunnel.PathLocal, nil
	local.Sent, local.Received = 5, 6

	plain := &ztunnel.FlowRecord{ // refused before it was registered: id 0, no open
		Direction: ztunnel.InboundPlaintext, Path: ztunnel.PathLocal,
		Src: netip.MustParseAddrPort("198.19.9.9:1234"), Dst: netip.MustParseAddrPort("198.19.2.10:8443"),
		DstID: id(payments), DstWorkload: payments, Flag: ztunnel.FlagStrictPlaintext,
		Verdict: ztunnel.Verdict{Flag: ztunnel.FlagStrictPlaintext},
	}
	tr := NewTraffic()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(tr)
	tr.Opened(local)
	tr.Closed(local)
	tr.Closed(plain)

	const l = `connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="unknown",destination_workload="payments-0",destination_workload_namespace="shop",`
	const s = `source_principal="spiffe://cluster.local/ns/shop/sa/frontend",source_workload="frontend",source_workload_namespace="shop"`
	const p = `connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="unknown",destination_workload="payments-0",destination_workload_namespace="shop",reporter="destination",response_flags="strict_plaintext",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"`
	const p0 = `connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="unknown",destination_workload="payments-0",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"`
	// The same-node flow is reported by both ends, since no other ztunnel
	// sees it; the refused plaintext one by the destination only.
	compare(t, reg, `
istio_tcp_connections_closed_total{`+l+`reporter="destination",response_flags="-",`+s+`} 1
istio_tcp_connections_closed_total{`+l+`reporter="source",response_flags="-",`+s+`} 1
istio_tcp_connections_closed_total{`+p+`} 1
istio_tcp_connections_failed_total{`+p+`} 1
istio_tcp_connections_opened_total{`+l+`reporter="destination",response_flags="-",`+s+`} 1
istio_tcp_connections_opened_total{`+l+`reporter="source",response_flags="-",`+s+`} 1
istio_tcp_connections_opened_total{`+p0+`} 1
istio_tcp_received_bytes_total{`+l+`reporter="destination",response_flags="-",`+s+`} 5
istio_tcp_received_bytes_total{`+l+`reporter="source",response_flags="-",`+s+`} 5
istio_tcp_sent_bytes_total{`+l+`reporter="destination",response_flags="-",`+s+`} 6
istio_tcp_sent_bytes_total{`+l+`reporter="source",response_flags="-",`+s+`} 6
`, trafficNames...)
}

func TestWorkloadNameStaysStableAcrossPods(t *testing.T) {
	for _, c := range []struct {
		w    *workload.Workload
		want string
	}{
		{&workload.Workload{Name: "web-6b7c-x2k4p", Labels: map[string]string{"app.kubernetes.io/name": "web", "app": "other"}}, "web"},
		{&workload.Workload{Name: "web-6b7c-x2k4p", Labels: map[string]string{"app": "web"}}, "web"},
		{&workload.Workload{Name: "db-0"}, "db-0"},
		{nil, "unknown"},
	} {
		if got := WorkloadName(c.w); got != c.want {
			t.Errorf("WorkloadName(%v) = %q, want %q", c.w, got, c.want)
		}
	}
}

func TestObserverCountsPolicyDecisions(t *testing.T) {
	o := NewObserver(ObserverOptions{})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(o.Collectors()...)
	inbound := func(id uint64) *ztunnel.FlowRecord {
		r := hboneOut(id)
		r.Direction = ztunnel.Inbound
		return r
	}
	allowed := inbound(1)
	allowed.Verdict.Policy, allowed.Verdict.Rule = "shop/payments-allow", 0
	byDefault := inbound(2)
	preChecked := hboneOut(3) // allowed at the source: the destination counts it
	denied := hboneOut(0)
	denied.Verdict = ztunnel.Verdict{Policy: "shop/deny-frontend", Rule: 1}
	denied.Flag = ztunnel.FlagPolicyDenied
	limited := hboneOut(0)
	limited.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagRateLimited, Policy: "shop/payments-rate"}
	limited.Flag = ztunnel.FlagRateLimited
	noAllow := hboneOut(0) // with the engine's own reason
	noAllow.Verdict = ztunnel.Verdict{Reason: "no-allow-matched", Rule: -1}
	noAllow.Flag = ztunnel.FlagPolicyDenied
	strict := hboneOut(0)
	strict.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagStrictPlaintext, Policy: "mantlet-system/mesh-defaults", Rule: -1}
	strict.Flag = ztunnel.FlagStrictPlaintext
	notAsked := hboneOut(0) // refused before the policy was asked
	notAsked.Verdict, notAsked.Flag = ztunnel.Verdict{}, ztunnel.FlagNoSVID
	cut := inbound(4) // admitted, then cut by a policy change: both count
	cut.Admitted = ztunnel.Verdict{Allow: true, Policy: "shop/payments-allow", Reason: "allowed-by-policy"}
	cut.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Rule: -1, Reason: "no-allow-matched"}
	cut.Flag = ztunnel.FlagPolicyDenied
	refusedThere := hboneOut(5) // the destination's 401: counted there
	refusedThere.Admitted = refusedThere.Verdict
	refusedThere.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagHBONERefused, Rule: -1, Reason: ztunnel.ReasonDeniedByDestination}
	refusedThere.Flag = ztunnel.FlagHBONERefused
	for _, r := range []*ztunnel.FlowRecord{allowed, byDefault, byDefault, preChecked, denied, limited, noAllow, strict, notAsked, cut, refusedThere} {
		o.FlowEnded(r)
	}
	want := `
# HELP mantlet_policy_decisions_total Policy decisions on connections, each counted once mesh-wide (allowed HBONE connections by the destination's node, denials where they happened; a connection cut by a policy change counts its allow and the deny), by action (allow, deny), reason and deciding policy (namespace/name; empty for defaults).
# TYPE mantlet_policy_decisions_total counter
mantlet_policy_decisions_total{action="allow",policy="",reason="allowed-by-default"} 2
mantlet_policy_decisions_total{action="allow",policy="shop/payments-allow",reason="allowed-by-policy"} 2
mantlet_policy_decisions_total{action="deny",policy="",reason="no-allow-matched"} 2
mantlet_policy_decisions_total{action="deny",policy="mantlet-system/mesh-defaults",reason="denied-plaintext-strict"} 1
mantlet_policy_decisions_total{action="deny",policy="shop/deny-frontend",reason="denied"} 1
mantlet_policy_decisions_total{action="deny",policy="shop/payments-rate",reason="rate_limited"} 1
# HELP mantlet_ratelimit_dropped_connections_total Connections refused by a policy's rateLimit, by limit (rate_limited: new connections per second of one source; max_connections: concurrent connections to the workload) and policy.
# TYPE mantlet_ratelimit_dropped_connections_total counter
mantlet_ratelimit_dropped_connections_total{limit="rate_limited",policy="shop/payments-rate"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"mantlet_policy_decisions_total", "mantlet_ratelimit_dropped_connections_total"); err != nil {
		t.Fatal(err)
	}
}

func TestCertificatesExportExpiryAndIssuance(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	certs := []identity.CertInfo{
		{ID: id(frontend), Serial: "1a", NotAfter: now.Add(90 * time.Minute)},
		{ID: id(payments), Serial: "2b", NotAfter: now.Add(-time.Minute)},         // expired
		{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/new")}, // not issued yet
	}
	c := NewCertificates(func() []identity.CertInfo { return certs }, func() time.Time { return now })
	c.OnIssue(id(frontend), nil)
	c.OnIssue(id(frontend), nil)
	c.OnIssue(id(payments), errors.New("CA unreachable"))
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP mantlet_svid_expiry_seconds Seconds until the node's SVID of this identity expires; negative once expired.
# TYPE mantlet_svid_expiry_seconds gauge
mantlet_svid_expiry_seconds{identity="spiffe://cluster.local/ns/shop/sa/frontend"} 5400
mantlet_svid_expiry_seconds{identity="spiffe://cluster.local/ns/shop/sa/payments"} -60
# HELP mantlet_svid_issuances_total Attempts to get an SVID from the CA (first fetches and renewals), by result: ok or failed.
# TYPE mantlet_svid_issuances_total counter
mantlet_svid_issuances_total{result="failed"} 1
mantlet_svid_issuances_total{result="ok"} 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}

type fakePool struct{}

func (fakePool) PoolConns() int { return 2 }
func (fakePool) PoolStats() hbone.Stats {
	return hbone.Stats{Handshakes: 3, Streams: 40, KeyExchanges: map[string]uint64{"X25519MLKEM768": 2, "X25519": 1}}
}
func (fakePool) ServerKeyExchanges() map[string]uint64 { return map[string]uint64{"X25519MLKEM768": 5} }

func TestPoolCollectorAndBuildInfo(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewPoolCollector(fakePool{}), BuildInfo())
	want := `
# HELP mantlet_hbone_pool_connections HBONE connections the ztunnel's client pool holds open.
# TYPE mantlet_hbone_pool_connections gauge
mantlet_hbone_pool_connections 2
# HELP mantlet_hbone_pool_handshakes_total TLS handshakes the HBONE client pool made (new connections to other nodes).
# TYPE mantlet_hbone_pool_handshakes_total counter
mantlet_hbone_pool_handshakes_total 3
# HELP mantlet_hbone_streams_total HBONE CONNECT streams opened by the client pool (one per proxied connection).
# TYPE mantlet_hbone_streams_total counter
mantlet_hbone_streams_total 40
# HELP mantlet_hbone_key_exchanges_total HBONE TLS handshakes completed, by side (client: the pool dialled; server: :15008 accepted) and the key exchange group agreed on (X25519MLKEM768 is post-quantum hybrid).
# TYPE mantlet_hbone_key_exchanges_total counter
mantlet_hbone_key_exchanges_total{key_exchange="X25519",side="client"} 1
mantlet_hbone_key_exchanges_total{key_exchange="X25519MLKEM768",side="client"} 2
mantlet_hbone_key_exchanges_total{key_exchange="X25519MLKEM768",side="server"} 5
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"mantlet_hbone_pool_connections", "mantlet_hbone_pool_handshakes_total", "mantlet_hbone_streams_total", "mantlet_hbone_key_exchanges_total"); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "mantlet_build_info" {
			continue
		}
		labels := map[string]string{}
		for _, lp := range mf.GetMetric()[0].GetLabel() {
			labels[lp.GetName()] = lp.GetValue()
		}
		if labels["version"] == "" || !strings.HasPrefix(labels["goversion"], "go") || mf.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("mantlet_build_info = %v %v", labels, mf.GetMetric()[0].GetGauge().GetValue())
		}
		return
	}
	t.Error("no mantlet_build_info")
}

// TestTrafficLabelIndexes: the series fill TrafficLabels by index.
func TestTrafficLabelIndexes(t *testing.T) {
	var s series
	if len(TrafficLabels) != len(s.values) || TrafficLabels[labelReporter] != "reporter" ||
		TrafficLabels[labelService] != "destination_service" || TrafficLabels[labelResponseFlags] != "response_flags" {
		t.Fatalf("TrafficLabels %q do not match the series' indexes", TrafficLabels)
	}
}

// TestTrafficCountsEachOpenFlowUnderItsOwnLabels: flows of different
// label sets, open at once and flushed in turn, each add their bytes to
// their own series; a flow whose record names other ends when it closes
// (the labels are taken from the record each time, as before series were
// shared) counts its bytes under the labels it opened with and its close
// under those it closed with.
func TestTrafficCountsEachOpenFlowUnderItsOwnLabels(t *testing.T) {
	tr := NewTraffic()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(tr)

	out1, out2 := hboneOut(1), hboneOut(2) // the same labels
	in := hboneOut(3)
	in.Direction = ztunnel.Inbound
	plain := hboneOut(4) // to a pod that is not meshed, without a service
	plain.Path, plain.MTLS, plain.Service, plain.DstWorkload, plain.DstID = ztunnel.PathPassthrough, false, nil, nil, spiffeid.ID{}
	changed := hboneOut(5)
	for _, r := range []*ztunnel.FlowRecord{out1, out2, in, plain, changed} {
		tr.Opened(r)
	}
	for i := int64(1); i <= 3; i++ {
		tr.Flush(1, 100*i, 1*i)
		tr.Flush(2, 1000*i, 10*i)
		tr.Flush(3, 10000*i, 100*i)
		tr.Flush(4, 100000*i, 1000*i)
	}
	out1.Sent, out1.Received = 301, 4
	out2.Sent, out2.Received = 3002, 30
	in.Sent, in.Received = 30003, 300
	plain.Sent, plain.Received, plain.Flag = 300004, 3000, ztunnel.FlagConnectFailed
	changed.Sent, changed.Received, changed.Service = 7, 8, nil
	for _, r := range []*ztunnel.FlowRecord{out1, out2, in, plain, changed} {
		tr.Closed(r)
	}

	const f = `connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="payments.shop.svc.cluster.local",destination_workload="payments-0",destination_workload_namespace="shop",`
	const noSvc = `connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/payments",destination_service="unknown",destination_workload="payments-0",destination_workload_namespace="shop",`
	const p = `connection_security_policy="none",destination_principal="unknown",destination_service="unknown",destination_workload="unknown",destination_workload_namespace="unknown",reporter="source",`
	const s = `source_principal="spiffe://cluster.local/ns/shop/sa/frontend",source_workload="frontend",source_workload_namespace="shop"`
	compare(t, reg, `
istio_tcp_connections_closed_total{`+f+`reporter="destination",response_flags="-",`+s+`} 1
istio_tcp_connections_closed_total{`+f+`reporter="source",response_flags="-",`+s+`} 2
istio_tcp_connections_closed_total{`+noSvc+`reporter="source",response_flags="-",`+s+`} 1
istio_tcp_connections_closed_total{`+p+`response_flags="connect_failed",`+s+`} 1
istio_tcp_connections_failed_total{`+p+`response_flags="connect_failed",`+s+`} 1
istio_tcp_connections_opened_total{`+f+`reporter="destination",response_flags="-",`+s+`} 1
istio_tcp_connections_opened_total{`+f+`reporter="source",response_flags="-",`+s+`} 3
istio_tcp_connections_opened_total{`+p+`response_flags="-",`+s+`} 1
istio_tcp_received_bytes_total{`+f+`reporter="destination",response_flags="-",`+s+`} 30003
istio_tcp_received_bytes_total{`+f+`reporter="source",response_flags="-",`+s+`} 3310
istio_tcp_received_bytes_total{`+p+`response_flags="-",`+s+`} 300004
istio_tcp_sent_bytes_total{`+f+`reporter="destination",response_flags="-",`+s+`} 300
istio_tcp_sent_bytes_total{`+f+`reporter="source",response_flags="-",`+s+`} 42
istio_tcp_sent_bytes_total{`+p+`response_flags="-",`+s+`} 3000
`, trafficNames...)
	if n := tr.OpenFlows(); n != 0 {
		t.Errorf("%d flows still tracked after close", n)
	}
}

// TestTrafficForgetsIdleSeriesButNotThoseOfOpenFlows: label sets that no
// open flow uses are kept for flows to come up to a bound, the least
// recently used forgotten first; those of open flows stay however many
// others come and go, and their bytes keep their labels.
func TestTrafficForgetsIdleSeriesButNotThoseOfOpenFlows(t *testing.T) {
	tr := NewTraffic()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(tr)
	long := hboneOut(1)
	tr.Opened(long)
	const others = 3 * maxIdleSeries
	for i := range others {
		r := hboneOut(uint64(i + 2))
		r.Service = &workload.Service{Name: fmt.Sprintf("svc-%d", i), Namespace: "shop"}
		tr.Opened(r)
		r.Sent, r.Received = 1, 1
		tr.Closed(r)
	}
	tr.mu.Lock()
	held, idle := len(tr.series), tr.nIdle
	tr.mu.Unlock()
	if held != maxIdleSeries+1 || idle != maxIdleSeries {
		t.Errorf("after %d flows of their own labels, Traffic holds %d label sets (%d idle), want %d (%d idle)",
			others+1, held, idle, maxIdleSeries+1, maxIdleSeries)
	}
	tr.Flush(1, 5, 6)
	long.Sent, long.Received = 7, 8
	tr.Closed(long)
	labels := prometheus.Labels{"reporter": "source",
		"source_workload": "frontend", "source_workload_namespace": "shop", "source_principal": id(frontend).String(),
		"destination_workload": "payments-0", "destination_workload_namespace": "shop", "destination_principal": id(payments).String(),
		"destination_service": "payments.shop.svc.cluster.local", "connection_security_policy": "mutual_tls", "response_flags": "-"}
	for _, c := range []struct {
		name string
		vec  *prometheus.CounterVec
		want float64
	}{
		{"opened", tr.opened, 1},
		{"closed", tr.closed, 1},
		{"received bytes", tr.received, 7},
		{"sent bytes", tr.sent, 8},
	} {
		if got := testutil.ToFloat64(c.vec.With(labels)); got != c.want {
			t.Errorf("%s of the flow open throughout = %v, want %v", c.name, got, c.want)
		}
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.series) != maxIdleSeries || tr.nIdle != maxIdleSeries {
		t.Errorf("with no flow open, Traffic holds %d label sets (%d idle), want %d", len(tr.series), tr.nIdle, maxIdleSeries)
	}
}

// TestOpenFlowsCostLittleHeap: 10,000 open flows cost telemetry at most
// 128 bytes of heap each, the entry of the open-flow table (label values
// are held once per distinct set; they cost 290 bytes a flow when each
// flow held its own).
func TestOpenFlowsCostLittleHeap(t *testing.T) {
	o := warmObserver(ztunnel.Outbound)
	if b := openFlowBytes(t, o, openRecords(1, 10_000, ztunnel.Outbound)); b > 128 {
		t.Errorf("telemetry keeps %.0f bytes per open flow, want ≤ 128", b)
	}
}

// TestAFlowOfKnownLabelsAllocatesNothing: opening, flushing and closing a
// flow whose labels other flows had, with the metrics and the flow ring,
// allocates nothing.
func TestAFlowOfKnownLabelsAllocatesNothing(t *testing.T) {
	o := warmObserver(ztunnel.Outbound)
	recs := openRecords(1, 1, ztunnel.Outbound)
	r := recs[0]
	allocs := testing.AllocsPerRun(1000, func() {
		r.ID++
		o.opened(r)
		o.Traffic.Flush(r.ID, 10, 20)
		r.Sent, r.Received = 30, 40
		o.FlowEnded(r)
	})
	if allocs != 0 {
		t.Errorf("a flow allocates %v times, want 0", allocs)
	}
}

// TestTrafficCountsFlowsOfManyGoroutines: flows opened, flushed and
// closed from several goroutines at once, over more label sets than
// Traffic keeps idle, are each counted once with all their bytes.
func TestTrafficCountsFlowsOfManyGoroutines(t *testing.T) {
	const workers, flows, services = 4, 500, 2 * maxIdleSeries
	tr := NewTraffic()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range flows {
				r := hboneOut(uint64(w*flows + i + 1))
				r.Service = &workload.Service{Name: fmt.Sprintf("svc-%d", (w*flows+i)%services), Namespace: "shop"}
				tr.Opened(r)
				tr.Flush(r.ID, 1, 2)
				r.Sent, r.Received = 3, 5
				tr.Closed(r)
			}
		})
	}
	wg.Wait()
	sum := func(v *prometheus.CounterVec) float64 {
		ch := make(chan prometheus.Metric, 4*services)
		v.Collect(ch)
		close(ch)
		var total float64
		for m := range ch {
			var pb dto.Metric
			if err := m.Write(&pb); err != nil {
				t.Fatal(err)
			}
			total += pb.GetCounter().GetValue()
		}
		return total
	}
	const n = workers * flows
	for _, c := range []struct {
		name string
		vec  *prometheus.CounterVec
		want float64
	}{
		{"opened", tr.opened, n}, {"closed", tr.closed, n}, {"received bytes", tr.received, 3 * n}, {"sent bytes", tr.sent, 5 * n},
	} {
		if got := sum(c.vec); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	if got := tr.OpenFlows(); got != 0 {
		t.Errorf("%d flows still tracked after close", got)
	}
}
