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
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured.
const DefaultTrustDomain = "cluster.local"

// DefaultSVIDTTL is the lifetime of an SVID unless configured otherwise.
const DefaultSVIDTTL = 24 * time.Hour

// ErrNotWorkloadID is returned by ParseWorkloadID for a valid SPIFFE ID
// whose path is not /ns/<namespace>/sa/<service account>.
var ErrNotWorkloadID = errors.New("not a workload identity (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")

// WorkloadID returns spiffe://<td>/ns/<ns>/sa/<sa>.
func WorkloadID(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: ns %q sa %q: %w", ns, sa, err)
	}
	return id, nil
}

// ParseWorkloadID parses s as a SPIFFE ID of the form
// spiffe://<td>/ns/<ns>/sa/<sa> and returns its parts. It returns an error
// wrapping ErrNotWorkloadID when s is a SPIFFE ID of another shape.
func ParseWorkloadID(s string) (id spiffeid.ID, ns, sa string, err error) {
	id, err = spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, "", "", fmt.Errorf("identity: parse %q: %w", s, err)
	}
	ns, sa, err = WorkloadOf(id)
	if err != nil {
		return spiffeid.ID{}, "", "", err
	}
	return id, ns, sa, nil
}

// WorkloadOf returns the namespace and service account named by id, or an
// error wrapping ErrNotWorkloadID.
func WorkloadOf(id spiffeid.ID) (ns, sa string, err error) {
	// spiffeid guarantees a clean path: no empty, "." or ".." segments.
	var segs [4]string
	p := id.Path()
	n := 0
	for p != "" && n < len(segs) {
		p = p[1:] // leading '/'
		i := 0
		for i < len(p) && p[i] != '/' {
			i++
		}
		segs[n] = p[:i]
		p = p[i:]
		n++
	}
	if n != 4 || p != "" || segs[0] != "ns" || segs[2] != "sa" {
		return "", "", fmt.Errorf("identity: %s: %w", id, ErrNotWorkloadID)
	}
	return segs[1], segs[3], nil
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
