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
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced,shortName=mp,categories=mantlet
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Action",type=string,JSONPath=`.spec.action`
// +kubebuilder:printcolumn:name="mTLS",type=string,JSONPath=`.spec.mtls`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,priority=1,JSONPath=`.status.conditions[?(@.type=="Accepted")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   MeshPolicySpec   `json:"spec"`
	Status MeshPolicyStatus `json:"status,omitempty"`
}

// MeshPolicyList is a list of MeshPolicy objects.
//
// +kubebuilder:object:root=true
type MeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []MeshPolicy `json:"items"`
}

// Action is what a policy does with the connections its rules match:
// ALLOW, DENY or AUDIT ("" is no action).
//
// +kubebuilder:validation:Enum=ALLOW;DENY;AUDIT;""
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

// MTLSMode says whether a workload accepts plaintext connections: STRICT
// or PERMISSIVE ("" leaves the choice to a less specific policy).
//
// +kubebuilder:validation:Enum=STRICT;PERMISSIVE;""
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
//
// +kubebuilder:validation:XValidation:rule="(has(self.action) && size(self.action) > 0) || !has(self.rules) || size(self.rules) == 0",message="required when spec.rules is set; want ALLOW, DENY or AUDIT",fieldPath=".action",reason=FieldValueRequired
// +kubebuilder:validation:XValidation:rule="!has(self.action) || !(self.action in ['DENY', 'AUDIT']) || (has(self.rules) && size(self.rules) > 0)",message="a DENY or AUDIT policy without rules matches nothing; add a rule (rules: [{}] matches every connection)",fieldPath=".rules",reason=FieldValueRequired
// +kubebuilder:validation:XValidation:rule="(has(self.action) && size(self.action) > 0) || (has(self.rules) && size(self.rules) > 0) || (has(self.mtls) && size(self.mtls) > 0) || has(self.rateLimit) || (has(self.defaultDeny) && self.defaultDeny)",message="sets nothing; want an action with rules, mtls, rateLimit or defaultDeny"
type MeshPolicySpec struct {
	// Selector picks the workloads (pods) the policy applies to, by label,
	// among the workloads of the policy's namespace (of every namespace for
	// a policy in the root namespace). Absent or empty selects them all.
	//
	// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",message="an operator is not In, NotIn, Exists or DoesNotExist",fieldPath=".matchExpressions"
	// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn'] ? (has(e.values) && size(e.values) > 0) : (!has(e.values) || size(e.values) == 0))",message="operators In and NotIn need values; Exists and DoesNotExist take none",fieldPath=".matchExpressions"
	Selector *metav1.LabelSelector `json:"selector,omitempty"`
	// Action is ALLOW, DENY or AUDIT; required when Rules is set.
	Action Action `json:"action,omitempty"`
	// Rules match connections; a connection matches the policy when it
	// matches any rule. An ALLOW policy without rules matches nothing, so
	// it admits nothing ("allow nothing").
	//
	// +kubebuilder:validation:MaxItems=32
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
	//
	// +kubebuilder:validation:MaxItems=8
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
//
// +kubebuilder:validation:MinProperties=1
type Source struct {
	// Principals are SPIFFE IDs: exact, "*" (any authenticated source), a
	// prefix followed by "*" or "*" followed by a suffix.
	//
	// +kubebuilder:validation:items:Pattern=`^(\*[^*]*|spiffe://[^*]*\*|spiffe://[a-z0-9._-]+(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))*)$`
	Principals []string `json:"principals,omitempty"`
	// NotPrincipals: the source's SPIFFE ID must be none of these.
	//
	// +kubebuilder:validation:items:Pattern=`^(\*[^*]*|spiffe://[^*]*\*|spiffe://[a-z0-9._-]+(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))*)$`
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	// Namespaces are namespace names of the source workload's identity.
	//
	// +kubebuilder:validation:items:MaxLength=63
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Namespaces []string `json:"namespaces,omitempty"`
	// NotNamespaces: the source's namespace must be none of these.
	//
	// +kubebuilder:validation:items:MaxLength=63
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// ServiceAccounts are "name" (in the policy's namespace) or
	// "namespace/name".
	//
	// +kubebuilder:validation:items:MaxLength=317
	// +kubebuilder:validation:items:Pattern=`^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	ServiceAccounts []string `json:"serviceAccounts,omitempty"`
	// NotServiceAccounts: the source's service account must be none of
	// these.
	//
	// +kubebuilder:validation:items:MaxLength=317
	// +kubebuilder:validation:items:Pattern=`^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	NotServiceAccounts []string `json:"notServiceAccounts,omitempty"`
	// IPBlocks match the source IP address (the client pod's real address).
	//
	// +kubebuilder:validation:MaxItems=32
	IPBlocks []IPBlock `json:"ipBlocks,omitempty"`
	// NotIPBlocks: the source IP address must be in none of these.
	//
	// +kubebuilder:validation:MaxItems=32
	NotIPBlocks []IPBlock `json:"notIpBlocks,omitempty"`
}

// IPBlock is a CIDR minus some sub-ranges.
//
// +kubebuilder:validation:XValidation:rule="!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, !isCIDR(e) || cidr(self.cidr).containsCIDR(e))",message="an entry is not inside cidr; want sub-ranges of it",fieldPath=".except"
type IPBlock struct {
	// CIDR such as 10.0.0.0/8 or fd00::/8, with no host bits set.
	//
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="not a CIDR; want an address and prefix length such as 10.0.0.0/8 or fd00::/8"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="has host bits set; want the network address, such as 10.0.0.0/8 for 10.1.2.3/8"
	CIDR string `json:"cidr"`
	// Except lists CIDRs inside CIDR that the block does not include.
	//
	// +kubebuilder:validation:MaxItems=8
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self)",message="not a CIDR; want an address and prefix length such as 10.0.0.0/8 or fd00::/8"
	// +kubebuilder:validation:items:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="has host bits set; want the network address, such as 10.0.0.0/8 for 10.1.2.3/8"
	Except []string `json:"except,omitempty"`
}

// Destination matches the destination port of a connection.
//
// +kubebuilder:validation:MinProperties=1
type Destination struct {
	// Ports are port numbers (8443) or inclusive ranges ("9000-9100").
	//
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:XIntOrString
	// +kubebuilder:validation:items:MaxLength=11
	// +kubebuilder:validation:items:XValidation:rule="type(self) != int || (self >= 1 && self <= 65535)",message="out of range; want a port 1-65535"
	// +kubebuilder:validation:items:XValidation:rule="type(self) != string || self.matches('^0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])(-0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$')",message="not a port or range; want a port 1-65535 or a range \"low-high\" such as \"9000-9100\""
	// +kubebuilder:validation:items:XValidation:rule="type(self) != string || !self.matches('^[0-9]+-[0-9]+$') || int(self.split('-')[0]) <= int(self.split('-')[1])",message="an empty range (low > high); want a range \"low-high\" such as \"9000-9100\""
	Ports []intstr.IntOrString `json:"ports,omitempty"`
	// NotPorts: the port must be none of these.
	//
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:XIntOrString
	// +kubebuilder:validation:items:MaxLength=11
	// +kubebuilder:validation:items:XValidation:rule="type(self) != int || (self >= 1 && self <= 65535)",message="out of range; want a port 1-65535"
	// +kubebuilder:validation:items:XValidation:rule="type(self) != string || self.matches('^0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])(-0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$')",message="not a port or range; want a port 1-65535 or a range \"low-high\" such as \"9000-9100\""
	// +kubebuilder:validation:items:XValidation:rule="type(self) != string || !self.matches('^[0-9]+-[0-9]+$') || int(self.split('-')[0]) <= int(self.split('-')[1])",message="an empty range (low > high); want a range \"low-high\" such as \"9000-9100\""
	NotPorts []intstr.IntOrString `json:"notPorts,omitempty"`
}

// RateLimit limits new connections to a workload. Zero fields are unset.
//
// +kubebuilder:validation:XValidation:rule="!has(self.burst) || self.burst == 0 || (has(self.connectionsPerSecond) && self.connectionsPerSecond > 0)",message="set without connectionsPerSecond; want both, or leave burst out",fieldPath=".burst"
// +kubebuilder:validation:XValidation:rule="(has(self.connectionsPerSecond) && self.connectionsPerSecond > 0) || (has(self.burst) && self.burst > 0) || (has(self.maxConnections) && self.maxConnections > 0)",message="sets nothing; want connectionsPerSecond (and burst) or maxConnections"
type RateLimit struct {
	// ConnectionsPerSecond is the sustained rate of new connections each
	// source identity (or source IP, for plaintext) may open to one
	// destination workload.
	//
	// +kubebuilder:validation:Minimum=0
	ConnectionsPerSecond int32 `json:"connectionsPerSecond,omitempty"`
	// Burst is how many new connections a source may open at once before
	// the rate applies; ConnectionsPerSecond when zero.
	//
	// +kubebuilder:validation:Minimum=0
	Burst int32 `json:"burst,omitempty"`
	// MaxConnections caps concurrent connections to one destination
	// workload, from all sources together.
	//
	// +kubebuilder:validation:Minimum=0
	MaxConnections int32 `json:"maxConnections,omitempty"`
}

// MeshPolicyStatus is what the mesh reports about a MeshPolicy.
type MeshPolicyStatus struct {
	// ObservedGeneration is the metadata.generation the status is about.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: "Accepted" is True when the policy is valid and in force,
	// False with reason Invalid and the validation errors as its message
	// when the agent refused it.
	//
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
