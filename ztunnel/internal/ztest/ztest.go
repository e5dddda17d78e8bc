// Package ztest holds helpers for the ztunnel's tests: an in-memory CA
// that mints X509-SVIDs from CSRs made here (as a node would), and an
// SVID source over it, so tests need neither root nor the SVID manager.
package ztest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CA is an in-memory CA for one trust domain that caches one SVID per
// identity.
type CA struct {
	*ca.CA
	skew  atomic.Int64 // added to the clock, in nanoseconds
	mu    sync.Mutex
	svids map[spiffeid.ID]*x509svid.SVID
	// Minted counts SVIDs minted.
	Minted int
}

// NewCA returns a CA for trust domain td (e.g. "cluster.local"). Its clock
// is opts.Now (default time.Now) shifted by Skew.
func NewCA(t testing.TB, td string, opts ca.Options) *CA {
	t.Helper()
	c := &CA{svids: make(map[spiffeid.ID]*x509svid.SVID)}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	opts.Now = func() time.Time { return now().Add(time.Duration(c.skew.Load())) }
	var err error
	c.CA, err = ca.New(spiffeid.RequireTrustDomainFromString(td), opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Skew shifts the CA's clock by d for the certificates it mints next (a
// negative d mints certificates that are already expired).
func (c *CA) Skew(d time.Duration) { c.skew.Store(int64(d)) }

// Mint signs a fresh key for id, valid for ttl.
func (c *CA) Mint(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	chain, err := c.SignCSR(context.Background(), csr, id, ttl)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// SVID returns the cached SVID of id, minting it (24h) on first use; it
// implements ztunnel.SVIDSource.
func (c *CA) SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.svids[id]; s != nil {
		return s, nil
	}
	s, err := c.Mint(id, 24*time.Hour)
	if err != nil {
		return nil, fmt.Errorf("ztest: mint %s: %w", id, err)
	}
	c.svids[id] = s
	c.Minted++
	return s, nil
}

// Set makes id use s (to present a foreign or expired certificate).
func (c *CA) Set(id spiffeid.ID, s *x509svid.SVID) {
	c.mu.Lock()
	c.svids[id] = s
	c.mu.Unlock()
}

// Bundles returns a bundle source trusting this CA's trust domain.
func (c *CA) Bundles() x509bundle.Source {
	b, _ := c.Bundle(context.Background())
	return x509bundle.NewSet(b)
}

// ID returns the workload identity of ns/sa in the CA's trust domain; it
// panics when ns or sa is not a valid path segment.
func (c *CA) ID(ns, sa string) spiffeid.ID {
	id, err := identity.WorkloadID(c.TrustDomain(), ns, sa)
	if err != nil {
		panic(err)
	}
	return id
}

// MintAny signs a fresh key for id with the CA's root key, whatever id's
// trust domain: a CA that overreaches, minting an identity of a domain it
// does not own (the real CA refuses to).
func (c *CA) MintAny(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	files, err := c.Files()
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(files[ca.RootKeyFile])
	if block == nil {
		return nil, fmt.Errorf("ztest: no root key in the CA")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("ztest: root key %T is no signer", k)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		URIs:         []*url.URL{id.URL()},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Root(), &key.PublicKey, signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}
