package telemetry

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

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
//
// An open flow costs a map entry (its id, its series and the bytes it has
// counted): the label values are held once per distinct set, by a series
// that the flows with those values share.
type Traffic struct {
	opened, closed, failed, sent, received *prometheus.CounterVec

	mu   sync.Mutex
	open map[uint64]flowCounters // by the registry's flow id
	peak shrink.Peak             // the most open held, so that it gives them back
	// series holds the label values of the open flows, each distinct
	// set once, and up to maxIdleSeries sets that no open flow uses any
	// more (idle, the most recently used first), so that flows that come
	// one after another do not make their series anew.
	series     map[seriesKey]*series
	seriesPeak shrink.Peak
	idle       series // the sentinel of the idle list: idle.next is the newest
	nIdle      int
}

// maxIdleSeries bounds the series that Traffic keeps for flows to come.
const maxIdleSeries = 128

// flowCounters is what Traffic remembers of one open flow: its series and
// how many bytes it has counted.
type flowCounters struct {
	s        *series
	up, down int64 // bytes counted so far, each way
}

// Indexes of TrafficLabels that a series does not fix.
const (
	labelReporter      = 0
	labelService       = 7
	labelResponseFlags = 9
)

// series is one distinct set of label values, shared by the flows that
// have them, with their counters as far as they have been used.
type series struct {
	key seriesKey
	// values are the label values in TrafficLabels' order, without
	// reporter and response_flags.
	values    [10]string
	reporters []string // one label set per reporter
	// The counters of each reporter's label set, with response_flags "-";
	// nil until first used, so that a series appears in the metrics
	// with its first count, as it would with WithLabelValues.
	opened, closed, received, sent [2]prometheus.Counter

	refs       int     // open flows that use it, and Closed while it counts
	prev, next *series // neighbours in Traffic.idle while refs is 0
}

// seriesKey is what a flow's label values are made of, the strings as
// the flow's workloads and identities hold them: flows with equal keys
// have the same label values. Making one copies no string.
type seriesKey struct {
	reporters      reporterSet
	mtls           bool
	srcName, srcNS string
	dstName, dstNS string
	srcID, dstID   string
	svc            bool
	svcName, svcNS string
}

// reporterSet says which ztunnels report a flow: an outbound flow is
// reported by the source; an inbound one by the destination; a flow
// between two pods of this node (path local) by both, since no other
// ztunnel sees it.
type reporterSet uint8

const (
	bySource reporterSet = iota
	byDestination
	byBoth
)

var reporterNames = [...][]string{
	bySource:      {ReporterSource},
	byDestination: {ReporterDestination},
	byBoth:        {ReporterSource, ReporterDestination},
}

// NewTraffic returns the TCP metrics, not registered.
func NewTraffic() *Traffic {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, TrafficLabels)
	}
	t := &Traffic{
		opened: vec("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed: vec("istio_tcp_connections_closed_total", "TCP connections closed, by response flag."),
		failed: vec("istio_tcp_connections_failed_total",
			"TCP connections that were refused or ended badly (closed with a response flag other than \"-\")."),
		received: vec("istio_tcp_received_bytes_total",
			"Bytes received by the destination: sent by the client (request direction), counted while connections are open."),
		sent: vec("istio_tcp_sent_bytes_total",
			"Bytes sent by the destination back to the client (response direction), counted while connections are open."),
		open:   map[uint64]flowCounters{},
		series: map[seriesKey]*series{},
	}
	t.idle.prev, t.idle.next = &t.idle, &t.idle
	return t
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
func (t *Traffic) Opened(r *ztunnel.FlowRecord) { t.opens(r) }

// opens is Opened; it returns the flow's series.
func (t *Traffic) opens(r *ztunnel.FlowRecord) *series {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fc, ok := t.open[r.ID]; ok && r.ID != 0 {
		return fc.s
	}
	s := t.acquireLocked(keyOf(r))
	t.countOpenedLocked(s)
	if r.ID != 0 {
		t.open[r.ID] = flowCounters{s: s}
	} else {
		t.releaseLocked(s)
	}
	return s
}

func (t *Traffic) countOpenedLocked(s *series) {
	for i := range s.reporters {
		s.counter(&s.opened[i], t.opened, i).Inc()
	}
}

// Flush adds the bytes that flow id has carried since it was last
// counted; up is the total from the client so far, down the total back
// to it. Flows not opened, or already closed, are ignored.
func (t *Traffic) Flush(id uint64, up, down int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fc, ok := t.open[id]; ok && t.addLocked(&fc, up, down) {
		t.open[id] = fc
	}
}

// Closed counts r as closed (and failed, with a response flag) and adds
// the bytes not counted yet (r.Sent and r.Received are the totals). A
// flow that was not opened (refused before it was registered) is counted
// as opened here.
func (t *Traffic) Closed(r *ztunnel.FlowRecord) { t.closes(r) }

// closes is Closed; it returns the series of r's labels.
func (t *Traffic) closes(r *ztunnel.FlowRecord) *series {
	k := keyOf(r)
	t.mu.Lock()
	defer t.mu.Unlock()
	fc, ok := t.open[r.ID]
	if ok && r.ID != 0 {
		shrink.Delete(&t.open, r.ID, &t.peak)
	} else {
		fc = flowCounters{s: t.acquireLocked(k)}
		t.countOpenedLocked(fc.s)
	}
	t.addLocked(&fc, r.Sent, r.Received)
	// The outcome is counted with the labels of the flow as it ended.
	s := fc.s
	if s.key != k {
		s = t.acquireLocked(k)
		defer t.releaseLocked(s)
	}
	for i := range s.reporters {
		if r.Flag == ztunnel.FlagNone {
			s.counter(&s.closed[i], t.closed, i).Inc()
			continue
		}
		lv := s.labelValues(i, r.Flag)
		t.closed.WithLabelValues(lv[:]...).Inc()
		t.failed.WithLabelValues(lv[:]...).Inc()
	}
	t.releaseLocked(fc.s)
	return s
}

// OpenFlows returns how many flows Traffic is counting bytes for.
func (t *Traffic) OpenFlows() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.open)
}

// addLocked counts the growth of fc's totals; totals never go back. Byte
// series appear with the first byte. It reports whether fc changed.
func (t *Traffic) addLocked(fc *flowCounters, up, down int64) bool {
	s, changed := fc.s, false
	if d := up - fc.up; d > 0 {
		for i := range s.reporters {
			s.counter(&s.received[i], t.received, i).Add(float64(d))
		}
		fc.up, changed = up, true
	}
	if d := down - fc.down; d > 0 {
		for i := range s.reporters {
			s.counter(&s.sent[i], t.sent, i).Add(float64(d))
		}
		fc.down, changed = down, true
	}
	return changed
}

// acquireLocked returns the series of k, made if there is none, and
// counts one more user of it.
func (t *Traffic) acquireLocked(k seriesKey) *series {
	s := t.series[k]
	switch {
	case s == nil:
		s = newSeries(k)
		t.series[k] = s
	case s.refs == 0:
		s.prev.next, s.next.prev = s.next, s.prev
		s.prev, s.next = nil, nil
		t.nIdle--
	}
	s.refs++
	return s
}

// releaseLocked counts one user of s less; a series no flow uses becomes
// the newest idle one, and the oldest idle one beyond maxIdleSeries is
// forgotten.
func (t *Traffic) releaseLocked(s *series) {
	if s.refs--; s.refs > 0 {
		return
	}
	s.prev, s.next = &t.idle, t.idle.next
	s.prev.next, s.next.prev = s, s
	if t.nIdle++; t.nIdle > maxIdleSeries {
		old := t.idle.prev
		old.prev.next, t.idle.prev = &t.idle, old.prev
		old.prev, old.next = nil, nil
		t.nIdle--
		shrink.Delete(&t.series, old.key, &t.seriesPeak)
	}
}

// counter returns *c, the counter of vec for reporter i's label set with
// response_flags "-", looked up on first use.
func (s *series) counter(c *prometheus.Counter, vec *prometheus.CounterVec, i int) prometheus.Counter {
	if *c == nil {
		lv := s.labelValues(i, ztunnel.FlagNone)
		*c = vec.WithLabelValues(lv[:]...)
	}
	return *c
}

// labelValues returns reporter i's label values with flag.
func (s *series) labelValues(i int, flag ztunnel.ResponseFlag) [10]string {
	lv := s.values
	lv[labelReporter], lv[labelResponseFlags] = s.reporters[i], flag.String()
	return lv
}

// serviceHostOf is ServiceHost(r.Service), without making the string
// anew when s holds it ("" when r has no service).
func (s *series) serviceHostOf(r *ztunnel.FlowRecord) string {
	switch svc := r.Service; {
	case svc == nil:
		return ""
	case s.key.svc && s.key.svcName == svc.Name && s.key.svcNS == svc.Namespace:
		return s.values[labelService]
	default:
		return ServiceHost(svc)
	}
}

func keyOf(r *ztunnel.FlowRecord) seriesKey {
	k := seriesKey{reporters: byDestination, mtls: r.MTLS,
		srcID: Unknown, dstID: Unknown}
	switch {
	case r.Direction == ztunnel.Outbound && r.Path == ztunnel.PathLocal:
		k.reporters = byBoth
	case r.Direction == ztunnel.Outbound:
		k.reporters = bySource
	}
	k.srcName, k.srcNS = workloadLabels(r.SrcWorkload)
	k.dstName, k.dstNS = workloadLabels(r.DstWorkload)
	if !r.SrcID.IsZero() {
		k.srcID = r.SrcID.String()
	}
	if !r.DstID.IsZero() {
		k.dstID = r.DstID.String()
	}
	if r.Service != nil {
		k.svc, k.svcName, k.svcNS = true, r.Service.Name, r.Service.Namespace
	}
	return k
}

func newSeries(k seriesKey) *series {
	security := SecurityNone
	if k.mtls {
		security = SecurityMutualTLS
	}
	svc := Unknown
	if k.svc {
		svc = serviceHost(k.svcName, k.svcNS)
	}
	return &series{key: k, reporters: reporterNames[k.reporters],
		values: [10]string{"", k.srcName, k.srcNS, k.srcID, k.dstName, k.dstNS, k.dstID, svc, security, ""}}
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
func ServiceHost(s *workload.Service) string { return serviceHost(s.Name, s.Namespace) }

func serviceHost(name, namespace string) string {
	return name + "." + namespace + ".svc.cluster.local"
}
