package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/source"
)

// DatapathCounters reads the data path's counters; *bpf.Datapath
// implements it.
type DatapathCounters interface {
	Counters() (bpf.Counters, error)
	// Repairs counts the repairs of the data path's kernel state by
	// fault.
	Repairs() map[bpf.Fault]uint64
}

// ConfigReloads reports the reloads of the workload source;
// every source.Source implements it.
type ConfigReloads interface {
	Status() source.Status
}

// Collector exports the agent's state, the data path's counters and the
// ztunnel's refusals to Prometheus under mantlet_ names.
type Collector struct {
	agent      *Agent
	reloads    ConfigReloads
	datapath   DatapathCounters
	rejections func() map[string]uint64

	ready, pods, reloadsDesc, lastReload, lastRejection, sourceUp, events, repairs, refused, plainClosed, refusedPods *prometheus.Desc
}

// NewCollector returns a collector over a; reloads, datapath and
// rejections (response flag → count, from the ztunnel) may be nil.
func NewCollector(a *Agent, reloads ConfigReloads, datapath DatapathCounters, rejections func() map[string]uint64) *Collector {
	return &Collector{
		agent: a, reloads: reloads, datapath: datapath, rejections: rejections,
		ready: prometheus.NewDesc("mantlet_agent_ready",
			"1 when the node can carry captured traffic (the readiness probe answers 200).", nil, nil),
		pods: prometheus.NewDesc("mantlet_agent_pods",
			"Local meshed pods by state: enrolled, or pending (not enrolled yet, retried).", []string{"state"}, nil),
		reloadsDesc: prometheus.NewDesc("mantlet_config_reloads_total",
			"Changed versions of the desired state (the cluster file, or a Kubernetes object such as a MeshPolicy), applied or rejected (the last good one stays in force).", []string{"result"}, nil),
		lastReload: prometheus.NewDesc("mantlet_config_last_reload_success",
			"1 when the newest version of the desired state is in force, 0 while a version (the cluster file, or a MeshPolicy edit) is rejected and the last good one stays in force ('mantlet status' says why).", nil, nil),
		lastRejection: prometheus.NewDesc("mantlet_config_last_rejection_timestamp_seconds",
			"When a version of the desired state was last rejected, in seconds since the Unix epoch; 0 if none was.", nil, nil),
		sourceUp: prometheus.NewDesc("mantlet_source_up",
			"1 while the source of the desired state can be read (a file always; the Kubernetes API server while it answers), 0 while the last state stays in force without it.", nil, nil),
		events: prometheus.NewDesc("mantlet_datapath_packets_total",
			"Packets and connections the eBPF programs handled, by event.", []string{"event"}, nil),
		repairs: prometheus.NewDesc("mantlet_datapath_repairs_total",
			"Pieces of the data path's kernel state found missing (a routing rule or route deleted, lo down, a program detached, a pin removed) and put back, by fault.", []string{"fault"}, nil),
		refused: prometheus.NewDesc("mantlet_ztunnel_refused_connections_total",
			"Connections the ztunnel refused or ended badly, by reason.", []string{"response_flags"}, nil),
		refusedPods: prometheus.NewDesc("mantlet_agent_refused_pods_total",
			"Times the agent refused to enroll a local meshed pod because mantlet cannot capture it on this node, by reason (BridgedCNINotSupported: the pod's address leads to a Linux bridge); counted once per pod and sandbox (a held pod whose sandbox the runtime retries counts again).", []string{"reason"}, nil),
		plainClosed: prometheus.NewDesc("mantlet_strict_plaintext_connections_closed_total",
			"Plaintext connections that bypassed the ztunnel, closed because their destination pod turned STRICT.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.ready
	ch <- c.pods
	ch <- c.plainClosed
	ch <- c.refusedPods
	if c.reloads != nil {
		ch <- c.reloadsDesc
		ch <- c.lastReload
		ch <- c.lastRejection
		ch <- c.sourceUp
	}
	if c.datapath != nil {
		ch <- c.events
		ch <- c.repairs
	}
	if c.rejections != nil {
		ch <- c.refused
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ready, _ := c.agent.Ready()
	ch <- prometheus.MustNewConstMetric(c.ready, prometheus.GaugeValue, boolValue(ready))
	var enrolled, pending float64
	for _, p := range c.agent.Pods() {
		if p.Ifindex != 0 && p.Err == "" {
			enrolled++
		} else {
			pending++
		}
	}
	ch <- prometheus.MustNewConstMetric(c.pods, prometheus.GaugeValue, enrolled, "enrolled")
	ch <- prometheus.MustNewConstMetric(c.pods, prometheus.GaugeValue, pending, "pending")
	ch <- prometheus.MustNewConstMetric(c.plainClosed, prometheus.CounterValue, float64(c.agent.PlaintextClosed()))
	ch <- prometheus.MustNewConstMetric(c.refusedPods, prometheus.CounterValue, float64(c.agent.RefusedBridged()), ReasonBridgedCNI)
	if c.reloads != nil {
		st := c.reloads.Status()
		ch <- prometheus.MustNewConstMetric(c.reloadsDesc, prometheus.CounterValue, float64(st.Applied), "applied")
		ch <- prometheus.MustNewConstMetric(c.reloadsDesc, prometheus.CounterValue, float64(st.Rejected), "rejected")
		ch <- prometheus.MustNewConstMetric(c.lastReload, prometheus.GaugeValue, boolValue(!st.LastEditRejected))
		var at float64
		if !st.RejectedAt.IsZero() {
			at = float64(st.RejectedAt.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(c.lastRejection, prometheus.GaugeValue, at)
		ch <- prometheus.MustNewConstMetric(c.sourceUp, prometheus.GaugeValue, boolValue(!st.Unreachable))
	}
	if c.datapath != nil {
		if n, err := c.datapath.Counters(); err == nil {
			for _, e := range n.Events() {
				ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(e.Value), e.Name)
			}
		} else {
			ch <- prometheus.NewInvalidMetric(c.events, err)
		}
		repairs := c.datapath.Repairs()
		for _, f := range bpf.Faults() {
			ch <- prometheus.MustNewConstMetric(c.repairs, prometheus.CounterValue, float64(repairs[f]), string(f))
		}
	}
	if c.rejections != nil {
		for flag, n := range c.rejections() {
			ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(n), flag)
		}
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
