package identity

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SVIDIssuer is an Issuer that makes the workloads' keys itself and hands
// out whole SVIDs, private key included. SPIRE's Delegated Identity API
// works this way: the SPIRE agent on the node makes each key, and only it
// and the node's ztunnel hold it. A Manager whose issuer is an SVIDIssuer
// calls FetchSVID where it would call SignCSR (which such an issuer may
// refuse) and checks the answer as strictly: it must name the identity
// asked for, its key must match its leaf, and it must chain to the trust
// bundle.
//
// Such an issuer renews SVIDs on its own schedule and says so: the
// Manager fetches an identity again as soon as the issuer reports a new
// SVID for it, and the trust bundle as soon as the issuer reports a new
// one; its own renewal at half-life stays as a fallback (an unchanged
// answer is then no renewal).
type SVIDIssuer interface {
	Issuer
	// FetchSVID returns the issuer's current SVID for id, leaf first,
	// with its private key.
	FetchSVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
	// Notify registers the function the issuer calls with an identity
	// whose SVID it replaced, or with the zero ID when the trust bundle
	// changed. The function does not block. NewManager registers it.
	Notify(func(spiffeid.ID))
	// Release says the Manager no longer keeps id (Forget), so the
	// issuer can stop watching it.
	Release(id spiffeid.ID)
}

// issueWhole gets id's SVID from an issuer that makes the keys and checks
// it as issue checks a signed request; it returns the SVID and the root it
// chains to.
func (m *Manager) issueWhole(ctx context.Context, si SVIDIssuer, id spiffeid.ID) (*x509svid.SVID, *x509.Certificate, error) {
	svid, err := si.FetchSVID(ctx, id)
	switch {
	case err != nil:
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer: %w", id, err)
	case svid == nil || len(svid.Certificates) == 0 || svid.PrivateKey == nil:
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned no certificate or no key", id)
	}
	pub, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(svid.Certificates[0].PublicKey) {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned a key that does not match the certificate", id)
	}
	root, err := m.verify(ctx, svid.Certificates, id)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned an unusable certificate: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: svid.Certificates, PrivateKey: svid.PrivateKey}, root, nil
}

// issuerUpdated is what an SVIDIssuer calls when it has a new SVID for id
// (or, for the zero ID, a new trust bundle): the Manager fetches it at
// once. An attempt already under way may have read the old one, so it is
// marked to be repeated when it ends.
func (m *Manager) issuerUpdated(id spiffeid.ID) {
	m.mu.Lock()
	if id.IsZero() {
		m.bundleNext = m.clock.Now()
	} else if e := m.entries[id]; e != nil {
		if e.fetching != nil {
			e.stale = true
		} else {
			e.renewAt = m.clock.Now()
		}
	}
	m.mu.Unlock()
	m.wake()
}
