package telemetry

import (
	"net/netip"
	"time"
	"unique"

	"github.com/mantlet/mantlet/events"
)

// ringFlow is an events.Flow as a FlowLog keeps it: 96 bytes
// instead of ~470 with its strings. What repeats from flow to flow (the
// kind of event, the verdict and policy, the names of each end) is kept
// once, as one unique.Handle shared by every event that has the same
// values; the canonical copy is freed when the last event that names it
// leaves the ring. What differs per flow (id, time, addresses, counters)
// is kept inline; an error string is interned too, so the same error
// costs its text once.
type ringFlow struct {
	unixNano   int64 // Time, unless its class says it is the zero time
	id         uint64
	sent, recv int64
	durationMS float64
	shape      unique.Handle[flowShape]
	err        unique.Handle[string] // noError when the flow had none
	srcAddr    packedAddr
	dstAddr    packedAddr
}

// flowShape is what many flows share: their class and the names of their
// ends.
type flowShape struct {
	class    flowClass
	src, dst endpointNames
}

// flowClass holds the fields of a flow that few distinct values take.
type flowClass struct {
	kind, event, stage, node, direction, path, flag string
	verdict, reason, policy, auditPolicy            string
	rule, auditRule                                 int
	mtls                                            bool
	zeroTime                                        bool
	loc                                             *time.Location // Time's; nil for UTC
}

// endpointNames is an events.Endpoint without its address (but with the
// address's IPv6 zone, which packedAddr does not hold).
type endpointNames struct {
	workload, namespace, identity, service, zone string
}

// packedAddr is a netip.AddrPort without its zone, in 20 bytes instead of
// 32.
type packedAddr struct {
	ip   [16]byte
	port uint16
	kind uint8 // 0: invalid, 4: IPv4, 6: IPv6
}

var noError unique.Handle[string]

func packAddr(ap netip.AddrPort) (packedAddr, string) {
	a := ap.Addr()
	switch {
	case a.Is4():
		return packedAddr{ip: a.As16(), port: ap.Port(), kind: 4}, ""
	case a.Is6():
		return packedAddr{ip: a.As16(), port: ap.Port(), kind: 6}, a.Zone()
	}
	return packedAddr{}, ""
}

func (p packedAddr) addrPort(zone string) netip.AddrPort {
	var a netip.Addr
	switch p.kind {
	case 4:
		a = netip.AddrFrom16(p.ip).Unmap()
	case 6:
		a = netip.AddrFrom16(p.ip).WithZone(zone)
	default:
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a, p.port)
}

// compact is ev as the ring keeps it. The time keeps its wall clock and
// location, not a monotonic reading (flow times are UTC, which has none).
func compact(ev *events.Flow) ringFlow {
	c := flowClass{
		kind: ev.Kind, event: ev.Event, stage: ev.Stage, node: ev.Node, direction: ev.Direction, path: ev.Path,
		flag: ev.ResponseFlag, verdict: ev.Verdict, reason: ev.Reason, policy: ev.Policy, auditPolicy: ev.AuditPolicy,
		rule: ev.Rule, auditRule: ev.AuditRule, mtls: ev.MTLS,
	}
	r := ringFlow{
		id: ev.ID, sent: ev.BytesSent, recv: ev.BytesReceived, durationMS: ev.DurationMS,
	}
	if ev.Time.IsZero() {
		c.zeroTime = true
	} else {
		r.unixNano = ev.Time.UnixNano()
		if loc := ev.Time.Location(); loc != time.UTC {
			c.loc = loc
		}
	}
	var srcZone, dstZone string
	r.srcAddr, srcZone = packAddr(ev.Src.Addr)
	r.dstAddr, dstZone = packAddr(ev.Dst.Addr)
	r.shape = unique.Make(flowShape{class: c,
		src: endpointNames{ev.Src.Workload, ev.Src.Namespace, ev.Src.Identity, ev.Src.Service, srcZone},
		dst: endpointNames{ev.Dst.Workload, ev.Dst.Namespace, ev.Dst.Identity, ev.Dst.Service, dstZone}})
	if ev.Error != "" {
		r.err = unique.Make(ev.Error)
	}
	return r
}

// flow rebuilds the events.Flow r was made from.
func (r *ringFlow) flow() events.Flow {
	sh := r.shape.Value()
	c, src, dst := &sh.class, &sh.src, &sh.dst
	f := events.Flow{
		Kind: c.kind, Event: c.event, Stage: c.stage, Node: c.node, ID: r.id, Direction: c.direction, Path: c.path,
		MTLS: c.mtls,
		Src: events.Endpoint{Addr: r.srcAddr.addrPort(src.zone), Workload: src.workload, Namespace: src.namespace,
			Identity: src.identity, Service: src.service},
		Dst: events.Endpoint{Addr: r.dstAddr.addrPort(dst.zone), Workload: dst.workload, Namespace: dst.namespace,
			Identity: dst.identity, Service: dst.service},
		BytesSent: r.sent, BytesReceived: r.recv, DurationMS: r.durationMS, ResponseFlag: c.flag,
		Verdict: c.verdict, Reason: c.reason, Policy: c.policy, Rule: c.rule,
		AuditPolicy: c.auditPolicy, AuditRule: c.auditRule,
	}
	if !c.zeroTime {
		f.Time = time.Unix(0, r.unixNano).UTC()
		if c.loc != nil {
			f.Time = f.Time.In(c.loc)
		}
	}
	if r.err != noError {
		f.Error = r.err.Value()
	}
	return f
}
