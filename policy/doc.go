// Package policy decides whether a connection to a mesh workload may go
// ahead. It validates MeshPolicy objects (package policy/v1alpha1),
// compiles a whole set of them all-or-nothing into an index keyed by
// destination workload and source identity, and answers Decide, MTLSMode
// and RateLimit in time independent of the number of policies, without
// allocating.
//
// Semantics, in order: a plaintext source to a STRICT workload is refused;
// any matching DENY rule refuses; a workload that no ALLOW policy selects
// admits the connection (unless default-deny applies to it); otherwise some
// ALLOW rule must match. AUDIT rules never refuse: their matches are
// reported in the Decision as what a DENY would have done.
package policy
