package v1alpha1

import (
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// MeshPolicy says which sources may open connections to the workloads it
// selects, whether those workloads accept plaintext, and how fast sources
// may connect. It is namespaced: it selects workloads of its own namespace,
// or of every namespace when it lives in the mesh root namespace
// (mantlet-system unless configured otherwise).
type MeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   MeshPolicySpec   `json:"spec"`
	Status MeshPolicyStatus `json:"status,omitempty"`
}

// MeshPolicyList is a list of MeshPolicy objects.
type MeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []MeshPolicy `json:"items"`
}

// Action is what a policy does with the connections its rules match.
type Action string

// The actions. A policy without an action takes no part in authorization
// (it may still set mtls, rateLimit or defaultDeny).
const (
	// ActionAllow admits matching connections; a workload selected by at
	// least one ALLOW policy admits only connections some ALLOW rule
	// matches.
	ActionAllow Action = "ALLOW"
	// ActionDeny refuses matching connections, whatever ALLOW says.
	ActionDeny Action = "DENY"
	// ActionAudit never blocks: a matching rule is recorded as what a DENY
	// would have refused.
	ActionAudit Action = "AUDIT"
)

// MTLSMode says whether a workload accepts plaintext connections.
type MTLSMode string

// The mTLS modes.
const (
	// MTLSStrict: only mutual-TLS (HBONE) connections reach the workload;
	// plaintext is dropped.
	MTLSStrict MTLSMode = "STRICT"
	// MTLSPermissive: mutual TLS and plaintext are both accepted.
	MTLSPermissive MTLSMode = "PERMISSIVE"
	// MTLSUnset: nothing chose a mode; the next source down the order of
	// precedence (or the agent's default) applies.
	MTLSUnset MTLSMode = ""
)

// ParseMTLSMode parses "STRICT" or "PERMISSIVE", in any case.
func ParseMTLSMode(s string) (MTLSMode, error) {
	switch {
	case strings.EqualFold(s, string(MTLSStrict)):
		return MTLSStrict, nil
	case strings.EqualFold(s, string(MTLSPermissive)):
		return MTLSPermissive, nil
	}
	return MTLSUnset, fmt.Errorf("mTLS mode %q: want STRICT or PERMISSIVE", s)
}

// Limits of a MeshPolicy. The API server can afford to check CIDRs and
// port ranges with CEL only in lists of bounded length, so the CRD declares
// these bounds (maxItems, maxLength), and package policy enforces the same,
// so that the API server and the agent accept the same policies. The
// +kubebuilder markers below repeat the numbers; a test checks the CRD.
const (
	// MaxRules is the most rules a policy has.
	MaxRules = 32
	// MaxSources is the most from entries a rule has.
	MaxSources = 8
	// MaxIPBlocks is the most ipBlocks, and the most notIpBlocks, a source
	// has.
	MaxIPBlocks = 32
	// MaxExcepts is the most except entries an IPBlock has.
	MaxExcepts = 8
	// MaxPorts is the most ports, and the most notPorts, a rule's to has.
	MaxPorts = 64
	// MaxPortLength is the length of the longest port string,
	// "65535-65535" (leading zeros count).
	MaxPortLength = 11
)

// MeshPolicySpec is the desired behaviour of a MeshPolicy.
type MeshPolicySpec struct {
	// Selector picks the workloads (pods) the policy applies to, by label,
	// among the workloads of the policy's namespace (of every namespace for
	// a policy in the root namespace). Absent or empty selects them all.
	Selector *metav1.LabelSelector `json:"selector,omitempty"`
	// Action is ALLOW, DENY or AUDIT; required when Rules is set.
	Action Action `json:"action,omitempty"`
	// Rules match connections; a connection matches the policy when it
	// matches any rule. An ALLOW policy without rules matches nothing, so
	// it admits nothing ("allow nothing").
	Rules []Rule `json:"rules,omitempty"`
	// MTLS is STRICT or PERMISSIVE for the selected workloads. The most
	// specific policy that sets it wins: selector in the workload's
	// namespace, then namespace-wide, then root namespace with selector,
	// then root namespace without (the mesh-wide default).
	MTLS MTLSMode `json:"mtls,omitempty"`
	// RateLimit limits new connections to the selected workloads.
	RateLimit *RateLimit `json:"rateLimit,omitempty"`
	// DefaultDeny makes the selected workloads refuse every connection no
	// ALLOW rule admits, even when no ALLOW policy selects them. Set in a
	// root-namespace policy without selector it is the mesh-wide
	// default-deny switch.
	DefaultDeny bool `json:"defaultDeny,omitempty"`
}

// Rule matches a connection when its source matches any entry of From (or
// From is empty) and its destination port matches To (or To is absent).
type Rule struct {
	// From lists alternative sources; empty matches every source.
	From []Source `json:"from,omitempty"`
	// To restricts the destination ports; absent matches every port.
	To *Destination `json:"to,omitempty"`
}

// Source matches the source of a connection. Every field that is set must
// match (AND); a list matches when any of its entries does (OR); a not-form
// matches when none of its entries does.
//
// Principals, namespaces and service accounts come from the source's
// authenticated SPIFFE ID. A plaintext source has none of them: a positive
// identity field never matches it and a not-form always does.
type Source struct {
	// Principals are SPIFFE IDs: exact, "*" (any authenticated source), a
	// prefix followed by "*" or "*" followed by a suffix.
	Principals    []string `json:"principals,omitempty"`
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	// Namespaces are namespace names of the source workload's identity.
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// ServiceAccounts are "name" (in the policy's namespace) or
	// "namespace/name".
	ServiceAccounts    []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts []string `json:"notServiceAccounts,omitempty"`
	// IPBlocks match the source IP address (the client pod's real address).
	IPBlocks    []IPBlock `json:"ipBlocks,omitempty"`
	NotIPBlocks []IPBlock `json:"notIpBlocks,omitempty"`
}

// IPBlock is a CIDR minus some sub-ranges.
type IPBlock struct {
	// CIDR such as 10.0.0.0/8 or fd00::/8, with no host bits set.
	CIDR string `json:"cidr"`
	// Except lists CIDRs inside CIDR that the block does not include.
	Except []string `json:"except,omitempty"`
}

// Destination matches the destination port of a connection.
type Destination struct {
	// Ports are port numbers (8443) or inclusive ranges ("9000-9100").
	Ports []intstr.IntOrString `json:"ports,omitempty"`
	// NotPorts: the port must be none of these.
	NotPorts []intstr.IntOrString `json:"notPorts,omitempty"`
}

// RateLimit limits new connections to a workload. Zero fields are unset.
type RateLimit struct {
	// ConnectionsPerSecond is the sustained rate of new connections each
	// source identity (or source IP, for plaintext) may open to one
	// destination workload.
	ConnectionsPerSecond int32 `json:"connectionsPerSecond,omitempty"`
	// Burst is how many new connections a source may open at once before
	// the rate applies; ConnectionsPerSecond when zero.
	Burst int32 `json:"burst,omitempty"`
	// MaxConnections caps concurrent connections to one destination
	// workload, from all sources together.
	MaxConnections int32 `json:"maxConnections,omitempty"`
}

// MeshPolicyStatus is what the mesh reports about a MeshPolicy.
type MeshPolicyStatus struct {
	// ObservedGeneration is the metadata.generation the status is about.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: "Accepted" is True when the policy is valid and in force.
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
