package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/source"
)

type fakeReloads source.Status

func (f fakeReloads) Status() source.Status { return source.Status(f) }

type fakeCounters struct {
	c       bpf.Counters
	err     error
	repairs map[bpf.Fault]uint64
}

func (f fakeCounters) Counters() (bpf.Counters, error) { return f.c, f.err }
func (f fakeCounters) Repairs() map[bpf.Fault]uint64   { return f.repairs }

func TestCollectorExportsTheNodeState(t *testing.T) {
	dp := newFakeDatapath()
	links := &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101}}
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: links, Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	a.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}, pod{"shop/b", "node-1", "198.19.1.2", "", true}))
	a.reconcile(t.Context(), time.Now())

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(a, fakeReloads{Applied: 3, Rejected: 1, RejectedAt: time.Unix(1764069000, 500e6)},
		fakeCounters{c: bpf.Counters{Redirected: 7, SpoofDrops: 2}, repairs: map[bpf.Fault]uint64{bpf.FaultRule: 2}},
		func() map[string]uint64 { return map[string]uint64{"NR": 4} }))
	want := `
# HELP mantlet_agent_pods Local meshed pods by state: enrolled, or pending (not enrolled yet, retried).
# TYPE mantlet_agent_pods gauge
mantlet_agent_pods{state="enrolled"} 1
mantlet_agent_pods{state="pending"} 1
# HELP mantlet_agent_ready 1 when the node can carry captured traffic (the readiness probe answers 200).
# TYPE mantlet_agent_ready gauge
mantlet_agent_ready 1
# HELP mantlet_config_last_reload_success 1 when the newest version of the desired state is in force, 0 while a version (the cluster file, or a MeshPolicy edit) is rejected and the last good one stays in force ('mantlet status' says why).
# TYPE mantlet_config_last_reload_success gauge
mantlet_config_last_reload_success 1
# HELP mantlet_config_last_rejection_timestamp_seconds When a version of the desired state was last rejected, in seconds since the Unix epoch; 0 if none was.
# TYPE mantlet_config_last_rejection_timestamp_seconds gauge
mantlet_config_last_rejection_timestamp_seconds 1.7640690005e+09
# HELP mantlet_config_reloads_total Changed versions of the desired state (the cluster file, or a Kubernetes object such as a MeshPolicy), applied or rejected (the last good one stays in force).
# TYPE mantlet_config_reloads_total counter
mantlet_config_reloads_total{result="applied"} 3
mantlet_config_reloads_total{result="rejected"} 1
# HELP mantlet_source_up 1 while the source of the desired state can be read (a file always; the Kubernetes API server while it answers), 0 while the last state stays in force without it.
# TYPE mantlet_source_up gauge
mantlet_source_up 1
# HELP mantlet_strict_plaintext_connections_closed_total Plaintext connections that bypassed the ztunnel, closed because their destination pod turned STRICT.
# TYPE mantlet_strict_plaintext_connections_closed_total counter
mantlet_strict_plaintext_connections_closed_total 0
# HELP mantlet_ztunnel_refused_connections_total Connections the ztunnel refused or ended badly, by reason.
# TYPE mantlet_ztunnel_refused_connections_total counter
mantlet_ztunnel_refused_connections_total{response_flags="NR"} 4
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"mantlet_agent_pods", "mantlet_agent_ready", "mantlet_config_reloads_total", "mantlet_config_last_reload_success",
		"mantlet_config_last_rejection_timestamp_seconds", "mantlet_source_up", "mantlet_strict_plaintext_connections_closed_total",
		"mantlet_ztunnel_refused_connections_total"); err != nil {
		t.Fatal(err)
	}
	wantPackets := `
# HELP mantlet_datapath_packets_total Packets and connections the eBPF programs handled, by event.
# TYPE mantlet_datapath_packets_total counter
mantlet_datapath_packets_total{event="assign_failed"} 0
mantlet_datapath_packets_total{event="assigned"} 0
mantlet_datapath_packets_total{event="excluded"} 0
mantlet_datapath_packets_total{event="leak_dropped"} 0
mantlet_datapath_packets_total{event="lookup_failed"} 0
mantlet_datapath_packets_total{event="lookup_hbone"} 0
mantlet_datapath_packets_total{event="lookup_inbound_plaintext"} 0
mantlet_datapath_packets_total{event="local_plain_redirected"} 0
mantlet_datapath_packets_total{event="lookup_outbound"} 0
mantlet_datapath_packets_total{event="no_listener_dropped"} 0
mantlet_datapath_packets_total{event="orphan_dropped"} 0
mantlet_datapath_packets_total{event="redirected"} 7
mantlet_datapath_packets_total{event="route_dropped"} 0
mantlet_datapath_packets_total{event="spoof_dropped"} 2
mantlet_datapath_packets_total{event="strict_dropped"} 0
mantlet_datapath_packets_total{event="uplink_redirected"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(wantPackets), "mantlet_datapath_packets_total"); err != nil {
		t.Fatal(err)
	}
	wantRepairs := `
# HELP mantlet_datapath_repairs_total Pieces of the data path's kernel state found missing (a routing rule or route deleted, lo down, a program detached, a pin removed) and put back, by fault.
# TYPE mantlet_datapath_repairs_total counter
mantlet_datapath_repairs_total{fault="attachment"} 0
mantlet_datapath_repairs_total{fault="capture-route"} 0
mantlet_datapath_repairs_total{fault="loopback"} 0
mantlet_datapath_repairs_total{fault="pin"} 0
mantlet_datapath_repairs_total{fault="routing-rule"} 2
mantlet_datapath_repairs_total{fault="sk-lookup"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(wantRepairs), "mantlet_datapath_repairs_total"); err != nil {
		t.Fatal(err)
	}
}

// TestCollectorSaysWhenTheSourceIsUnreachable: mantlet_source_up is 0
// while the API server does not answer.
func TestCollectorSaysWhenTheSourceIsUnreachable(t *testing.T) {
	a, err := New(Config{Node: "node-1", Datapath: newFakeDatapath(), Links: &fakeLinks{}, Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		st   source.Status
		want string
	}{
		{source.Status{Kind: "kubernetes", Applied: 1}, "1"},
		{source.Status{Kind: "kubernetes", Applied: 1, Unreachable: true, UnreachableSince: time.Unix(1764069000, 0)}, "0"},
	} {
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(NewCollector(a, fakeReloads(tc.st), nil, nil))
		if got, err := testutil.GatherAndCount(reg, "mantlet_source_up"); err != nil || got != 1 {
			t.Fatalf("mantlet_source_up: %d series, %v", got, err)
		}
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "mantlet_source_up" {
				if got := fmt.Sprint(mf.GetMetric()[0].GetGauge().GetValue()); got != tc.want {
					t.Errorf("unreachable=%v: mantlet_source_up %s, want %s", tc.st.Unreachable, got, tc.want)
				}
			}
		}
	}
}

func TestCollectorShowsARejectedEdit(t *testing.T) {
	a, err := New(Config{Node: "node-1", Datapath: newFakeDatapath(), Links: &fakeLinks{}, Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name                                   string
		st                                     source.Status
		success, rejectedAt, applied, rejected string
	}{
		{"nothing rejected yet", source.Status{Applied: 2}, "1", "0", "2", "0"},
		{"the newest version rejected", source.Status{Applied: 2, Rejected: 1, RejectedAt: time.Unix(1764069000, 0),
			LastEditRejected: true, Problems: []string{"cluster.yaml: no objects"}}, "0", "1.764069e+09", "2", "1"},
		{"a later version applied", source.Status{Applied: 3, Rejected: 1, RejectedAt: time.Unix(1764069000, 0)}, "1", "1.764069e+09", "3", "1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewPedanticRegistry()
			reg.MustRegister(NewCollector(a, fakeReloads(tc.st), nil, nil))
			want := `
# HELP mantlet_config_last_reload_success 1 when the newest version of the desired state is in force, 0 while a version (the cluster file, or a MeshPolicy edit) is rejected and the last good one stays in force ('mantlet status' says why).
# TYPE mantlet_config_last_reload_success gauge
mantlet_config_last_reload_success ` + tc.success + `
# HELP mantlet_config_last_rejection_timestamp_seconds When a version of the desired state was last rejected, in seconds since the Unix epoch; 0 if none was.
# TYPE mantlet_config_last_rejection_timestamp_seconds gauge
mantlet_config_last_rejection_timestamp_seconds ` + tc.rejectedAt + `
# HELP mantlet_config_reloads_total Changed versions of the desired state (the cluster file, or a Kubernetes object such as a MeshPolicy), applied or rejected (the last good one stays in force).
# TYPE mantlet_config_reloads_total counter
mantlet_config_reloads_total{result="applied"} ` + tc.applied + `
mantlet_config_reloads_total{result="rejected"} ` + tc.rejected + "\n"
			if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "mantlet_config_last_reload_success",
				"mantlet_config_last_rejection_timestamp_seconds", "mantlet_config_reloads_total"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCollectorReportsUnreadableCounters(t *testing.T) {
	a, err := New(Config{Node: "node-1", Datapath: newFakeDatapath(), Links: &fakeLinks{}, Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(a, nil, fakeCounters{err: errors.New("map gone")}, nil))
	if _, err := reg.Gather(); err == nil || !strings.Contains(err.Error(), "map gone") {
		t.Fatalf("Gather error = %v, want the counters' error", err)
	}
}
