// Package identity names workloads with SPIFFE IDs and keeps their
// X509-SVIDs: it parses and builds spiffe://<trust-domain>/ns/<ns>/sa/<sa>
// IDs, defines the Issuer seam behind which a CA signs certificate
// requests, and runs the per-node SVID manager that fetches, caches and
// rotates one SVID per local identity.
package identity

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain of identities when none is
// configured: cluster.local, as in Kubernetes and Istio.
var DefaultTrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// DefaultSVIDTTL is the lifetime of an SVID unless configured otherwise.
const DefaultSVIDTTL = 24 * time.Hour

// ErrNotWorkloadID is returned by ParseWorkloadID for a SPIFFE ID whose
// path is not /ns/<namespace>/sa/<service account>.
var ErrNotWorkloadID = errors.New("identity: not a workload identity (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")

// WorkloadID returns spiffe://<td>/ns/<ns>/sa/<sa>: the identity of the
// workloads that run as service account sa of namespace ns. It fails when
// ns or sa is not a valid path segment (empty, ".", "..", or with a "/" or
// a character SPIFFE forbids).
func WorkloadID(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: ns %q sa %q: %w", ns, sa, err)
	}
	return id, nil
}

// ParseWorkloadID returns the namespace and service account that a
// workload identity spiffe://<td>/ns/<ns>/sa/<sa> names, in any trust
// domain, or ErrNotWorkloadID for an ID of another shape. It does not
// allocate, so the policy engine calls it on every decision. Parse a
// string with spiffeid.FromString first.
func ParseWorkloadID(id spiffeid.ID) (ns, sa string, err error) {
	// spiffeid guarantees a clean path: no empty, "." or ".." segments.
	rest, ok := strings.CutPrefix(id.Path(), "/ns/")
	if !ok {
		return "", "", ErrNotWorkloadID
	}
	ns, sa, ok = strings.Cut(rest, "/sa/")
	if !ok || strings.Contains(ns, "/") || strings.Contains(sa, "/") {
		return "", "", ErrNotWorkloadID
	}
	return ns, sa, nil
}

// Issuer signs certificate requests for workload identities. The in-process
// CA (package identity/ca) is one; a cluster CA service or SPIRE can be
// others. An Issuer never sees private keys of workloads.
type Issuer interface {
	// SignCSR signs the DER-encoded PKCS#10 request for id, valid for ttl
	// (the issuer may shorten it), and returns the chain leaf first,
	// without the root.
	SignCSR(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error)
	// Bundle returns the current trust bundle of the issuer's trust domain.
	Bundle(ctx context.Context) (*x509bundle.Bundle, error)
}

// A SigningRooter is an Issuer that says which root certificate the SVIDs
// it signs now chain to. When that root changes (a root rotation was
// activated), the Manager renews the SVIDs it holds under another root
// early, spread over ManagerOptions.ReissueSpread, rather than at their
// half-life, so that the old root can leave the trust bundle soon. The
// in-process CA and the cluster CA's client are SigningRooters.
type SigningRooter interface {
	SigningRoot(ctx context.Context) (*x509.Certificate, error)
}
