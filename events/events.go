// Package events is what mantlet writes for machines to read: the access
// log (a line per connection) and the security events (every refusal on
// policy, every open connection a policy change cut, every AUDIT hit,
// every HBONE client closed for abusing the protocol).
// Both are JSON lines of one versioned schema (Schema; docs/observability.md
// has every field) and describe a connection in one shape, Flow. One
// Writer writes either stream without ever blocking the data path: a
// bounded queue and a rate limit, with a summary line that counts what
// was suppressed.
package events

import (
	"net/netip"
	"time"
)

// Schema is the version of the JSON lines, their "v" field. It changes
// when a field changes its meaning or goes away; a new field does not
// change it.
const Schema = 1

// Kinds of lines (the "kind" field).
const (
	// KindFlow: an access log line, or a flow of the admin API.
	KindFlow = "flow"
	// KindSecurityEvent: a security event.
	KindSecurityEvent = "security_event"
	// KindSuppressed: a Writer's summary of the lines it suppressed.
	KindSuppressed = "suppressed"
)

// Events: what a line reports (the "event" field).
const (
	// Open and Close: a connection was admitted, or ended (KindFlow).
	Open  = "open"
	Close = "close"
	// Deny: a connection was refused or, at StageReevaluate, closed
	// (KindSecurityEvent).
	Deny = "deny"
	// Audit: an AUDIT policy matched a connection, which it did not affect
	// (KindSecurityEvent).
	Audit = "audit"
)

// Verdicts of the policy (the "verdict" field).
const (
	Allowed = "allowed"
	Denied  = "denied"
)

// Stages say where a security event's decision was taken (the "stage"
// field).
const (
	// StageConnect: when the connection arrived at the ztunnel that
	// decides (the destination's, or the source's for same-node traffic).
	StageConnect = "connect"
	// StagePreCheck: the source ztunnel's early check before tunnelling
	// to another node.
	StagePreCheck = "precheck"
	// StageReevaluate: an open connection decided again after a policy or
	// workload change.
	StageReevaluate = "reevaluate"
	// StageProtocol: an HBONE client with a valid certificate abused the
	// protocol (reason "rapid-reset" or "frame-flood") and its connection
	// was closed by the destination's ztunnel.
	StageProtocol = "protocol"
)

// Flow describes a connection: one access log line, one security event,
// one entry of the admin API's recent flows. Its JSON form (Append,
// MarshalJSON) is the schema; decoding uses the field tags. Empty optional
// fields are left out.
type Flow struct {
	// Time is when the line was made.
	Time time.Time `json:"time"`
	// Kind is KindFlow or KindSecurityEvent; Event what happened (Open,
	// Close; Deny, Audit).
	Kind  string `json:"kind"`
	Event string `json:"event"`
	// Stage is where a security event's decision was taken.
	Stage string `json:"stage"`
	// Node is the node that wrote the line (set by the Writer).
	Node string `json:"node"`
	// ID is the flow's id in the ztunnel's open-flow registry; open and
	// close lines of a flow share it. 0 when the flow was not registered
	// (refused before it was admitted).
	ID uint64 `json:"id"`
	// Direction is the ztunnel's: "outbound", "inbound" (HBONE) or
	// "inbound_plaintext"; Path "hbone", "local" or "passthrough".
	Direction string `json:"direction"`
	Path      string `json:"path"`
	// MTLS is true when the source's identity was authenticated.
	MTLS bool `json:"mtls"`
	// Src and Dst are the client and the destination pod (after service
	// resolution).
	Src Endpoint `json:"src"`
	Dst Endpoint `json:"dst"`
	// BytesSent went from the client to the destination, BytesReceived
	// back, and DurationMS is how long the connection lasted, all so far:
	// 0 at open and for refusals.
	BytesSent     int64   `json:"bytes_sent"`
	BytesReceived int64   `json:"bytes_received"`
	DurationMS    float64 `json:"duration_ms"`
	// ResponseFlag is "-" or why the connection was refused or failed
	// (ztunnel.ResponseFlag).
	ResponseFlag string `json:"response_flag"`
	// Verdict is Allowed or Denied, empty when policy was not asked;
	// Reason says why (the engine's reason, "rate-limited",
	// "max-connections", "denied-by-destination"...). Policy
	// (namespace/name) and Rule (an index, -1 when the policy decided
	// without a rule: STRICT, rate limits) name what decided; Rule means
	// nothing without Policy.
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Policy  string `json:"policy"`
	Rule    int    `json:"rule"`
	// AuditPolicy and AuditRule name the AUDIT policy and rule that
	// matched (Event Audit).
	AuditPolicy string `json:"audit_policy"`
	AuditRule   int    `json:"audit_rule"`
	// Error is the underlying error, when there was one.
	Error string `json:"error"`
}

// Endpoint is one end of a flow.
type Endpoint struct {
	// Addr is the IP and port; invalid when not known.
	Addr netip.AddrPort `json:"addr"`
	// Workload (the pod's name) and Namespace are empty when the address
	// is no known workload.
	Workload  string `json:"workload"`
	Namespace string `json:"namespace"`
	// Identity is the SPIFFE ID: the authenticated one for the source
	// (empty for plaintext), the workload's for the destination.
	Identity string `json:"identity"`
	// Service is the service the client dialled, as
	// <name>.<namespace>.svc.cluster.local (destination only).
	Service string `json:"service"`
}

// Sink receives flows. Emit must not block and must not keep f past the
// call; it is called on the data path.
type Sink interface {
	Emit(f *Flow)
}
