package telemetry

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/shrink"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
)

// TrafficLabels are the labels of the Istio-compatible TCP metrics, in
// order. Their values come from a closed set or from the cluster's
// workloads, never from a connection (no addresses, no client ports), so
// the number of series is bounded by (workloads × workloads × services ×
// response flags), see docs/observability.md.
var TrafficLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service",
	"connection_security_policy",
	"response_flags",
}

// Label values.
const (
	// Unknown stands for a label value that is not known (Istio's
	// convention).
	Unknown = "unknown"
	// ReporterSource is the ztunnel of the client's node; ReporterDestination
	// the ztunnel of the destination's node.
	ReporterSource      = "source"
	ReporterDestination = "destination"
	// SecurityMutualTLS marks connections whose source identity was
	// authenticated (HBONE, or the same-node path where the identity is
	// bound to the sending veth); SecurityNone plaintext.
	SecurityMutualTLS = "mutual_tls"
	SecurityNone      = "none"
)

// Traffic holds the Istio-compatible TCP metrics:
//
//	istio_tcp_connections_opened_total
//	istio_tcp_connections_closed_total
//	istio_tcp_connections_failed_total   (closed with a response flag other than "-")
//	istio_tcp_received_bytes_total       (bytes from the client to the destination)
//	istio_tcp_sent_bytes_total           (bytes from the destination back to the client)
//
// Bytes are counted while connections are open: Flush adds what a live
// flow carried since it was last counted, and Closed adds the remainder,
// so each byte is counted once. Opened, bytes and closed carry the same
// labels except response_flags, which is "-" for opened and bytes (the
// outcome is not known yet) and the flow's flag for closed and failed.
// Traffic is safe for concurrent use.
type Traffic struct {
	opened, closed, failed, sent, received *prometheus.CounterVec

	mu   sync.Mutex
	open map[uint64]*flowCounters // by the registry's flow id
	peak shrink.Peak              // the most open held, so that it gives them back
}

// flowCounters is what Traffic remembers of one open flow: the counters
// of its label sets (one per reporter) and how many bytes it has counted.
type flowCounters struct {
	t        *Traffic
	labels   [][]string // one set per reporter
	up, down int64      // bytes counted so far, each way
}

// NewTraffic returns the TCP metrics, not registered.
func NewTraffic() *Traffic {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, TrafficLabels)
	}
	return &Traffic{
		opened: vec("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed: vec("istio_tcp_connections_closed_total", "TCP connections closed, by response flag."),
		failed: vec("istio_tcp_connections_failed_total",
			"TCP connections that were refused or ended badly (closed with a response flag other than \"-\")."),
		received: vec("istio_tcp_received_bytes_total",
			"Bytes received by the destination: sent by the client (request direction), counted while connections are open."),
		sent: vec("istio_tcp_sent_bytes_total",
			"Bytes sent by the destination back to the client (response direction), counted while connections are open."),
		open: map[uint64]*flowCounters{},
	}
}

// Describe implements prometheus.Collector.
func (t *Traffic) Describe(ch chan<- *prometheus.Desc) {
	for _, v := range t.vecs() {
		v.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (t *Traffic) Collect(ch chan<- prometheus.Metric) {
	for _, v := range t.vecs() {
		v.Collect(ch)
	}
}

func (t *Traffic) vecs() []*prometheus.CounterVec {
	return []*prometheus.CounterVec{t.opened, t.closed, t.failed, t.received, t.sent}
}

// Opened counts the flow r describes as opened and starts counting its
// bytes under r.ID (see Observer.FlowOpened).
func (t *Traffic) Opened(r *ztunnel.FlowRecord) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.openLocked(r.ID, recordEnds(r))
}

func (t *Traffic) openLocked(id uint64, e flowEnds) *flowCounters {
	if fc, ok := t.open[id]; ok && id != 0 {
		return fc
	}
	fc := &flowCounters{t: t, labels: e.labelSets(ztunnel.FlagNone)}
	for _, lv := range fc.labels {
		t.opened.WithLabelValues(lv...).Inc()
	}
	if id != 0 {
		t.open[id] = fc
	}
	return fc
}

// Flush adds the bytes that flow id has carried since it was last
// counted; up is the total from the client so far, down the total back
// to it. Flows not opened, or already closed, are ignored.
func (t *Traffic) Flush(id uint64, up, down int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fc, ok := t.open[id]; ok {
		fc.add(up, down)
	}
}

// Closed counts r as closed (and failed, with a response flag) and adds
// the bytes not counted yet (r.Sent and r.Received are the totals). A
// flow that was not opened (refused before it was registered) is counted
// as opened here.
func (t *Traffic) Closed(r *ztunnel.FlowRecord) {
	e := recordEnds(r)
	t.mu.Lock()
	fc := t.openLocked(r.ID, e)
	shrink.Delete(&t.open, r.ID, &t.peak)
	t.mu.Unlock()
	fc.add(r.Sent, r.Received)
	for _, lv := range e.labelSets(r.Flag) {
		t.closed.WithLabelValues(lv...).Inc()
		if r.Flag != ztunnel.FlagNone {
			t.failed.WithLabelValues(lv...).Inc()
		}
	}
}

// OpenFlows returns how many flows Traffic is counting bytes for.
func (t *Traffic) OpenFlows() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.open)
}

// add counts the growth of the totals; totals never go back. Byte series
// appear with the first byte.
func (fc *flowCounters) add(up, down int64) {
	if d := up - fc.up; d > 0 {
		for _, lv := range fc.labels {
			fc.t.received.WithLabelValues(lv...).Add(float64(d))
		}
		fc.up = up
	}
	if d := down - fc.down; d > 0 {
		for _, lv := range fc.labels {
			fc.t.sent.WithLabelValues(lv...).Add(float64(d))
		}
		fc.down = down
	}
}

// flowEnds is what the labels are made of.
type flowEnds struct {
	dir          ztunnel.Direction
	path         ztunnel.Path
	src, dst     *workload.Workload
	srcID, dstID spiffeid.ID
	svc          *workload.Service
	mtls         bool
}

func recordEnds(r *ztunnel.FlowRecord) flowEnds {
	return flowEnds{dir: r.Direction, path: r.Path, src: r.SrcWorkload, dst: r.DstWorkload,
		srcID: r.SrcID, dstID: r.DstID, svc: r.Service, mtls: r.MTLS}
}

// labelSets returns the label values, one set per reporter: an outbound
// flow is reported by the source; an inbound one by the destination; a
// flow between two pods of this node (path local) by both, since no other
// ztunnel sees it.
func (e flowEnds) labelSets(flag ztunnel.ResponseFlag) [][]string {
	security := SecurityNone
	if e.mtls {
		security = SecurityMutualTLS
	}
	svc := Unknown
	if e.svc != nil {
		svc = ServiceHost(e.svc)
	}
	srcName, srcNS := workloadLabels(e.src)
	dstName, dstNS := workloadLabels(e.dst)
	srcID, dstID := Unknown, Unknown
	if !e.srcID.IsZero() {
		srcID = e.srcID.String()
	}
	if !e.dstID.IsZero() {
		dstID = e.dstID.String()
	}
	set := func(reporter string) []string {
		return []string{reporter, srcName, srcNS, srcID, dstName, dstNS, dstID, svc, security, flag.String()}
	}
	switch {
	case e.dir == ztunnel.Outbound && e.path == ztunnel.PathLocal:
		return [][]string{set(ReporterSource), set(ReporterDestination)}
	case e.dir == ztunnel.Outbound:
		return [][]string{set(ReporterSource)}
	default:
		return [][]string{set(ReporterDestination)}
	}
}

// WorkloadName is the name a workload goes by in metrics: its
// app.kubernetes.io/name or app label, else its pod name. Labels keep the
// number of series stable across rollouts (pod names change with every
// one).
func WorkloadName(w *workload.Workload) string {
	if w == nil {
		return Unknown
	}
	for _, k := range []string{"app.kubernetes.io/name", "app"} {
		if v := w.Labels[k]; v != "" {
			return v
		}
	}
	return w.Name
}

func workloadLabels(w *workload.Workload) (name, ns string) {
	if w == nil {
		return Unknown, Unknown
	}
	return WorkloadName(w), w.Namespace
}

// ServiceHost is a service's name as Istio reports it:
// <name>.<namespace>.svc.cluster.local.
func ServiceHost(s *workload.Service) string {
	return s.Name + "." + s.Namespace + ".svc.cluster.local"
}
