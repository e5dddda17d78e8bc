// Package admin serves the node's admin API (HTTP on 127.0.0.1:15000 and a
// unix socket) and holds its Go client, which the operator commands
// (mantlet status, workloads, certs, policy check, flows) use. The API is
// read-only: it shows the node's state and answers "what would policy say
// about this connection?"; it changes nothing.
//
// Endpoints, all GET, all JSON:
//
//	/v1/status         readiness and why not: data path, listeners, snapshot, policies, certificates
//	/v1/workloads      the workloads the node knows, with the enrollment state of local ones
//	/v1/services       services and their endpoints
//	/v1/policies       the policies in force and their generation
//	/v1/certs          the node's SVIDs: identity, serial, validity, renewal
//	/v1/datapath       eBPF attachment state and counters
//	/v1/flows          recent flows with verdicts (filters: verdict, namespace, workload, event, limit);
//	                   follow=1 streams new ones as JSON lines
//	/v1/policy/check   evaluates a hypothetical flow (from, to, port) with the live engine and snapshot
package admin

import (
	"encoding/json"
	"time"
)

// DefaultAddr is where the agent serves the admin API over TCP: localhost
// only.
const DefaultAddr = "127.0.0.1:15000"

// SocketPath returns the default unix socket of a node's admin API.
func SocketPath(node string) string { return "/run/mantlet/" + node + "/admin.sock" }

// Status says whether the node can carry captured traffic, and why not.
type Status struct {
	Node    string `json:"node"`
	Version string `json:"version,omitempty"`
	Ready   bool   `json:"ready"`
	// Reason is the readiness probe's answer: what is missing, or a
	// summary when ready.
	Reason string `json:"reason"`
	// Problems lists what needs attention even when ready (pods not
	// enrolled, certificates expiring or failing to renew).
	Problems []string       `json:"problems,omitempty"`
	Datapath DatapathStatus `json:"datapath"`
	Snapshot SnapshotStatus `json:"snapshot"`
	Config   ConfigStatus   `json:"config"`
	Policy   PolicyStatus   `json:"policy"`
	Certs    CertsStatus    `json:"certs"`
	// Bundles are the trust bundles the node verifies peers with: its own
	// trust domain's first, then federated ones.
	Bundles []TrustBundle `json:"trust_bundles,omitempty"`
	Flows   FlowsStatus   `json:"flows"`
}

// TrustBundle is one trust domain's bundle as the node holds it.
type TrustBundle struct {
	TrustDomain string       `json:"trust_domain"`
	Roots       []BundleRoot `json:"roots"`
	// Federated is true for a foreign trust domain's bundle, read from
	// the file Source (mantlet agent --federate); Reloads counts the
	// changes read from it after the first.
	Federated bool   `json:"federated,omitempty"`
	Source    string `json:"source,omitempty"`
	Reloads   uint64 `json:"reloads,omitempty"`
	// ChangedAt is when the bundle last changed, CheckedAt when it was
	// last read from its source.
	ChangedAt time.Time `json:"changed_at,omitzero"`
	CheckedAt time.Time `json:"checked_at,omitzero"`
	// Failures counts consecutive failed reads; LastError is the last
	// one's message. The last good bundle stays in use meanwhile.
	Failures  int    `json:"failures,omitempty"`
	LastError string `json:"last_error,omitempty"`
}

// BundleRoot is one root certificate of a trust bundle.
type BundleRoot struct {
	// Fingerprint is the SHA-256 of the certificate (hex); SVIDs name
	// their root by it (Cert.Root).
	Fingerprint string    `json:"fingerprint"`
	Subject     string    `json:"subject"`
	NotAfter    time.Time `json:"not_after"`
	// Signing marks the root the CA signs new SVIDs under.
	Signing bool `json:"signing,omitempty"`
}

// ConfigStatus says which version of the cluster file is in force and
// whether the newest one was rejected.
type ConfigStatus struct {
	// Available is false when the agent reads no cluster file.
	Available bool `json:"available"`
	// Source is where the desired state comes from: "file" (File names
	// it) or "kubernetes".
	Source string `json:"source,omitempty"`
	File   string `json:"file,omitempty"`
	// Applied and Rejected count the changed versions of the file since
	// the agent started.
	Applied  uint64 `json:"applied"`
	Rejected uint64 `json:"rejected"`
	// AppliedAt is when the version in force was read; RejectedAt when a
	// version was last rejected (absent if none was).
	AppliedAt  time.Time `json:"applied_at,omitzero"`
	RejectedAt time.Time `json:"rejected_at,omitzero"`
	// LastEditRejected is true while the newest version of the file is
	// rejected: the version of AppliedAt stays in force, and
	// LastEditProblems says why, one problem each.
	LastEditRejected bool     `json:"last_edit_rejected"`
	LastEditProblems []string `json:"last_edit_problems,omitempty"`
	// Unreachable is true while the source cannot be read (the API
	// server does not answer) since UnreachableSince.
	Unreachable      bool      `json:"unreachable,omitempty"`
	UnreachableSince time.Time `json:"unreachable_since,omitzero"`
}

// DatapathStatus is the eBPF data path's attachment state.
type DatapathStatus struct {
	// Available is false when the agent runs without a data path.
	Available        bool `json:"available"`
	SkLookupAttached bool `json:"sk_lookup_attached"`
	// Listeners are the ztunnel listeners in the SOCKMAP (outbound,
	// inbound_plaintext, hbone).
	Listeners []string `json:"listeners"`
	// Pods and Uplinks count the interfaces with programs attached.
	Pods    int `json:"pods"`
	Uplinks int `json:"uplinks"`
	// Problems are the pieces of kernel state found missing (a deleted
	// routing rule, a detached program, ...) and not repaired yet; the
	// node is not ready while there are any.
	Problems []string `json:"problems,omitempty"`
	// Repairs counts, by fault, the pieces of kernel state the agent
	// found missing and put back since it started.
	Repairs map[string]uint64 `json:"repairs,omitempty"`
}

// SnapshotStatus describes the workload snapshot in force.
type SnapshotStatus struct {
	Generation     uint64 `json:"generation"`
	Workloads      int    `json:"workloads"`
	LocalWorkloads int    `json:"local_workloads"`
	Services       int    `json:"services"`
	Nodes          int    `json:"nodes"`
	// Enrolled and Pending count the local pods the agent enrolled, or
	// keeps trying to.
	Enrolled int `json:"enrolled"`
	Pending  int `json:"pending"`
}

// PolicyStatus describes the policy set in force.
type PolicyStatus struct {
	Available  bool   `json:"available"`
	Generation uint64 `json:"generation"`
	Policies   int    `json:"policies"`
}

// CertsStatus sums up the node's SVIDs.
type CertsStatus struct {
	Identities int `json:"identities"`
	// Expiring are identities whose SVID expires within
	// ExpiryWarning; Expired those past NotAfter; Failing those whose last
	// renewal attempt failed.
	Expiring []string `json:"expiring,omitempty"`
	Expired  []string `json:"expired,omitempty"`
	Failing  []string `json:"failing,omitempty"`
}

// FlowsStatus counts flows.
type FlowsStatus struct {
	Open   int    `json:"open"`
	Logged uint64 `json:"logged"`
}

// ExpiryWarning is how close to expiry a certificate counts as expiring,
// at most (the alert rule uses the same bound): see WarnWithin.
const ExpiryWarning = 2 * time.Hour

// WarnWithin is how close to its expiry a certificate valid from notBefore
// to notAfter counts as expiring: ExpiryWarning, or a quarter of its
// lifetime when that is shorter. Renewal is due at half-life, so a
// certificate this close to its end has missed its renewal; short-lived
// SVIDs (SPIRE's last an hour) are not reported as expiring all the time.
func WarnWithin(notBefore, notAfter time.Time) time.Duration {
	if notBefore.IsZero() || !notAfter.After(notBefore) {
		return ExpiryWarning
	}
	return min(ExpiryWarning, notAfter.Sub(notBefore)/4)
}

// Workload is one workload as the node knows it.
type Workload struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	UID            string            `json:"uid,omitempty"`
	ServiceAccount string            `json:"service_account"`
	Identity       string            `json:"identity,omitempty"`
	Node           string            `json:"node"`
	IPs            []string          `json:"ips"`
	Labels         map[string]string `json:"labels,omitempty"`
	// Enrolled says the workload is in the mesh.
	Enrolled bool `json:"enrolled"`
	// Local is true for workloads of this node; State is then enrolled or
	// pending (with Error), and Veth the host-side interface index.
	Local bool   `json:"local"`
	State string `json:"state,omitempty"`
	Veth  int    `json:"veth,omitempty"`
	Error string `json:"error,omitempty"`
	// MTLSMode is STRICT or PERMISSIVE, as policy sets it; Strict says
	// the data path enforces STRICT for this local pod (it follows the
	// mode once the agent re-enrolled the pod).
	MTLSMode string `json:"mtls_mode,omitempty"`
	Strict   bool   `json:"strict,omitempty"`
}

// Service is one service and its endpoints.
type Service struct {
	Namespace string        `json:"namespace"`
	Name      string        `json:"name"`
	VIPs      []string      `json:"vips"`
	Ports     []ServicePort `json:"ports"`
	// Endpoints are namespace/name of the workloads behind the service.
	Endpoints []string `json:"endpoints"`
}

// ServicePort maps a service port to the workloads' port.
type ServicePort struct {
	Name       string `json:"name,omitempty"`
	Port       uint16 `json:"port"`
	TargetPort uint16 `json:"target_port"`
}

// Policies is the policy set in force.
type Policies struct {
	Generation uint64            `json:"generation"`
	Policies   []json.RawMessage `json:"policies"`
}

// Cert describes the node's SVID of one identity.
type Cert struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	IssuedAt  time.Time `json:"issued_at,omitzero"`
	RenewAt   time.Time `json:"renew_at,omitzero"`
	// ExpiresInSeconds is NotAfter minus now (negative once expired).
	ExpiresInSeconds float64 `json:"expires_in_seconds"`
	Failures         int     `json:"failures,omitempty"`
	LastError        string  `json:"last_error,omitempty"`
	// Root is the fingerprint of the trust bundle's root the SVID chains
	// to (BundleRoot.Fingerprint).
	Root string `json:"root,omitempty"`
}

// DatapathInfo is the eBPF data path's state and counters.
type DatapathInfo struct {
	DatapathStatus
	// Counters are the programs' counters summed over CPUs, by the event
	// names of the mantlet_datapath_packets_total metric.
	Counters map[string]uint64 `json:"counters,omitempty"`
	Error    string            `json:"error,omitempty"`
}

// Check is the answer of /v1/policy/check.
type Check struct {
	// Verdict is allowed or denied; Allowed the same as a bool.
	Verdict string `json:"verdict"`
	Allowed bool   `json:"allowed"`
	// Reason is the policy engine's reason (allowed-by-default,
	// denied-by-policy, ...); Message says it in a sentence.
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// Action, Policy and Rule name the deciding policy rule (Rule -1 and
	// Policy "" for defaults); RuleSpec is that rule as written.
	Action   string          `json:"action,omitempty"`
	Policy   string          `json:"policy,omitempty"`
	Rule     int             `json:"rule"`
	RuleSpec json.RawMessage `json:"rule_spec,omitempty"`
	// Audit lists AUDIT policies that would have denied the connection.
	Audit []AuditHit `json:"audit,omitempty"`
	// Source and Destination say how --from and --to were understood.
	Source      CheckSource      `json:"source"`
	Destination CheckDestination `json:"destination"`
	// Generation is the policy set the answer comes from.
	Generation uint64 `json:"generation"`
}

// AuditHit names an AUDIT policy and the index of its rule that matched.
type AuditHit struct {
	Policy string `json:"policy"`
	Rule   int    `json:"rule"`
}

// CheckSource is the source of a checked flow.
type CheckSource struct {
	Identity string `json:"identity,omitempty"`
	IP       string `json:"ip,omitempty"`
	Workload string `json:"workload,omitempty"`
	// MTLS is true when the source would authenticate (a mesh workload or
	// an identity); false for a plaintext source.
	MTLS bool `json:"mtls"`
}

// CheckDestination is the destination of a checked flow.
type CheckDestination struct {
	Workload string `json:"workload,omitempty"`
	Identity string `json:"identity,omitempty"`
	IP       string `json:"ip,omitempty"`
	Port     uint16 `json:"port"`
	Service  string `json:"service,omitempty"`
	MTLSMode string `json:"mtls_mode,omitempty"`
	// Meshed is false when the destination is no mesh workload.
	Meshed bool `json:"meshed"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

// Lost is the line a flow stream sends when the follower fell behind and
// events were dropped.
type Lost struct {
	Event string `json:"event"` // "lost"
	Lost  uint64 `json:"lost"`
}
