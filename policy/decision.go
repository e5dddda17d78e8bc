package policy

import (
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// Input describes one connection, as the destination ztunnel sees it.
type Input struct {
	// SrcID is the source's SPIFFE ID from its client certificate; zero
	// for plaintext.
	SrcID spiffeid.ID
	// SrcNamespace and SrcServiceAccount are the source's identity parts.
	// When empty they are taken from SrcID if it is a workload ID
	// (spiffe://<td>/ns/<ns>/sa/<sa>) of the engine's trust domain. They
	// are ignored for plaintext.
	SrcNamespace, SrcServiceAccount string
	// SrcIP is the client's address.
	SrcIP netip.Addr
	// Dst is the destination workload; nil when the destination is not a
	// mesh workload.
	Dst *workload.Workload
	// DstPort is the destination port.
	DstPort uint16
	// MTLS is true when the source authenticated with mutual TLS.
	MTLS bool
}

// Reason says why a Decision came out as it did. The set is closed; its
// strings are stable (metrics labels, access logs, security events).
type Reason uint8

// The reasons.
const (
	// ReasonAllowedByDefault: no ALLOW policy selects the destination and
	// default-deny does not apply to it.
	ReasonAllowedByDefault Reason = iota
	// ReasonAllowedByPolicy: an ALLOW rule matched.
	ReasonAllowedByPolicy
	// ReasonNotMeshed: the destination is no mesh workload; mesh policy
	// does not apply.
	ReasonNotMeshed
	// ReasonDeniedByPolicy: a DENY rule matched.
	ReasonDeniedByPolicy
	// ReasonDeniedByDefaultDeny: no ALLOW policy selects the destination
	// and default-deny applies to it.
	ReasonDeniedByDefaultDeny
	// ReasonNoAllowMatched: ALLOW policies select the destination but none
	// of their rules matched.
	ReasonNoAllowMatched
	// ReasonPlaintextStrict: a plaintext source to a destination in STRICT
	// mTLS mode.
	ReasonPlaintextStrict
	numReasons
)

var reasonNames = [numReasons]string{
	ReasonAllowedByDefault:    "allowed-by-default",
	ReasonAllowedByPolicy:     "allowed-by-policy",
	ReasonNotMeshed:           "allowed-not-meshed",
	ReasonDeniedByPolicy:      "denied-by-policy",
	ReasonDeniedByDefaultDeny: "denied-by-default-deny",
	ReasonNoAllowMatched:      "no-allow-matched",
	ReasonPlaintextStrict:     "denied-plaintext-strict",
}

// String returns the reason's stable name, e.g. "denied-by-policy".
func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Reasons returns every reason, for metric initialisation and tests.
func Reasons() []Reason {
	out := make([]Reason, numReasons)
	for i := range out {
		out[i] = Reason(i)
	}
	return out
}

// MaxAuditHits is how many AUDIT hits a Decision carries.
const MaxAuditHits = 4

// AuditHit names an AUDIT policy whose rule matched the connection.
type AuditHit struct {
	// Policy is the policy's namespace/name.
	Policy string
	// Rule is the index in spec.rules of the first rule that matched.
	Rule int
}

// Decision is the verdict on one connection.
type Decision struct {
	// Allowed is the verdict.
	Allowed bool
	// Reason says why.
	Reason Reason
	// Action is the action of the policy that decided: ALLOW, DENY, or ""
	// when no policy rule decided (defaults, STRICT).
	Action v1alpha1.Action
	// Policy is namespace/name of the deciding policy ("" for defaults;
	// for ReasonPlaintextStrict the policy that set STRICT, "" when it is
	// the engine's default mode).
	Policy string
	// Rule is the index in spec.rules of the deciding rule, -1 for none.
	Rule int
	// AuditCount is how many AUDIT policies matched; Audit holds the first
	// MaxAuditHits of them in policy order (by namespace/name). An AUDIT
	// hit records what a DENY policy with the same rules would have
	// refused; it never changes Allowed.
	Audit      [MaxAuditHits]AuditHit
	AuditCount int
}

// AuditHits returns the recorded AUDIT hits (a view of d.Audit).
func (d *Decision) AuditHits() []AuditHit {
	return d.Audit[:min(d.AuditCount, MaxAuditHits)]
}

// RateLimit is the rate limit in force for a workload.
type RateLimit struct {
	// ConnectionsPerSecond and Burst limit new connections per source
	// identity (per source IP for plaintext); zero is unlimited.
	ConnectionsPerSecond int32
	Burst                int32
	// MaxConnections caps concurrent connections to the workload; zero is
	// unlimited.
	MaxConnections int32
	// Policy is namespace/name of the policy that set the limit.
	Policy string
}
