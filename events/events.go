// Package events records security events: every connection the mesh
// refuses on policy (deny, default deny, STRICT plaintext, rate and
// connection limits), every open connection a policy change cut, every
// AUDIT hit, and every HBONE client closed for abusing the protocol. Events are JSON lines in a flat, stable shape that a
// SIEM ingests (see Event), written by a Writer that never blocks the
// data path: a bounded queue and a rate limit, with a summary line that
// counts what was suppressed.
package events

import (
	"net/netip"
	"time"
)

// Verdict is what happened to the connection.
type Verdict string

// Verdicts.
const (
	// Deny: the connection was refused (or, for StageReevaluate, closed).
	Deny Verdict = "deny"
	// Audit: an AUDIT policy matched; the connection was not affected by
	// it.
	Audit Verdict = "audit"
)

// Stage says where the decision was taken.
type Stage string

// Stages.
const (
	// StageConnect: when the connection arrived at the ztunnel that
	// decides (the destination's, or the source's for same-node traffic).
	StageConnect Stage = "connect"
	// StagePreCheck: the source ztunnel's early check before tunnelling
	// to another node.
	StagePreCheck Stage = "precheck"
	// StageReevaluate: an open connection re-decided after a policy or
	// workload change.
	StageReevaluate Stage = "reevaluate"
	// StageProtocol: an HBONE client with a valid certificate abused the
	// protocol (reason "rapid-reset" or "frame-flood") and its connection
	// was closed by the destination's ztunnel.
	StageProtocol Stage = "protocol"
)

// Event is one security event. Its JSON form (Append) is one line with
// the fields below; empty fields are left out.
type Event struct {
	// Time of the decision.
	Time time.Time
	// Verdict and Stage: see their types.
	Verdict Verdict
	Stage   Stage
	// Reason is the decision's stable reason, e.g. "denied-by-policy",
	// "denied-by-default-deny", "denied-plaintext-strict",
	// "no-allow-matched", "rate-limited", "max-connections"; for an AUDIT
	// hit the reason of the actual verdict.
	Reason string
	// Flag is the ztunnel response flag the connection got
	// ("policy_denied", "rate_limited", ...); "-" when it went on.
	Flag string
	// PolicyNamespace, PolicyName and Rule name the deciding policy and
	// the index of its rule (-1: none, e.g. default deny).
	PolicyNamespace, PolicyName string
	Rule                        int
	// Node is the node whose ztunnel decided.
	Node string
	// Direction is the ztunnel's direction ("inbound", "outbound",
	// "inbound_plaintext").
	Direction string
	// MTLS is true when the source was authenticated.
	MTLS bool
	// SrcID is the source's SPIFFE ID ("" for plaintext), Src its
	// address, SrcWorkload and SrcNamespace its workload when known.
	SrcID                     string
	Src                       netip.AddrPort
	SrcWorkload, SrcNamespace string
	// DstID, Dst, DstWorkload, DstNamespace: the same for the
	// destination.
	DstID                     string
	Dst                       netip.AddrPort
	DstWorkload, DstNamespace string
}

// Sink receives events. Emit must not block and must not keep e past the
// call; it is called on the data path.
type Sink interface {
	Emit(e *Event)
}

// SinkFunc adapts a function to Sink.
type SinkFunc func(e *Event)

// Emit calls fn.
func (fn SinkFunc) Emit(e *Event) { fn(e) }

// Discard is a Sink that drops every event.
var Discard Sink = SinkFunc(func(*Event) {})
