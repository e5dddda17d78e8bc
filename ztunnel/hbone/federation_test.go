package hbone_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
)

// federatedBundles is what a node of trust domain a.test verifies peers
// with when it is given b.test's bundle: its own CA's bundle for a.test,
// the federated file for b.test.
func federatedBundles(t testing.TB, caA, caB *ztest.CA) x509bundle.Source {
	t.Helper()
	bB, err := caB.Bundle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pem, err := bB.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "b.test.pem")
	if err := os.WriteFile(file, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	fed, err := identity.NewFederation(caA.TrustDomain(), []identity.FederatedBundle{{TrustDomain: caB.TrustDomain(), File: file}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return identity.TrustBundles(caA.TrustDomain(), caA.Bundles(), fed)
}

func raw(s *x509svid.SVID) [][]byte {
	var out [][]byte
	for _, c := range s.Certificates {
		out = append(out, c.Raw)
	}
	return out
}

// TestVerifyPeerTakesEachDomainsBundleOnlyForItsOwnIDs checks, with two
// CAs of two trust domains that signed nothing of each other, that a node
// of a.test federated with b.test accepts the SVIDs each CA issues for
// its own domain and refuses an ID of one domain signed by the other
// domain's CA, in both directions: a bundle vouches only for IDs of its
// trust domain. A domain without a bundle is refused as untrusted.
func TestVerifyPeerTakesEachDomainsBundleOnlyForItsOwnIDs(t *testing.T) {
	caA := ztest.NewCA(t, "a.test", ca.Options{})
	caB := ztest.NewCA(t, "b.test", ca.Options{})
	caC := ztest.NewCA(t, "c.test", ca.Options{})
	bundles := federatedBundles(t, caA, caB)
	idA := caA.ID("shop", "client")
	idB := caB.ID("shop", "server")
	mint := func(c *ztest.CA, id spiffeid.ID) *x509svid.SVID {
		t.Helper()
		s, err := c.MintAny(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	for _, tc := range []struct {
		name string
		svid *x509svid.SVID
		want error
	}{
		{"a.test's own ID signed by a.test's CA is accepted", mint(caA, idA), nil},
		{"b.test's ID signed by b.test's CA is accepted through the federated bundle", mint(caB, idB), nil},
		{"b.test's ID signed by a.test's CA is refused", mint(caA, idB), hbone.ErrUnknownAuthority},
		{"a.test's ID signed by b.test's CA is refused", mint(caB, idA), hbone.ErrUnknownAuthority},
		{"c.test's ID is refused: no bundle", mint(caC, caC.ID("shop", "x")), hbone.ErrUntrustedDomain},
		{"c.test's ID signed by b.test's CA is refused: no bundle", mint(caB, caC.ID("shop", "x")), hbone.ErrUntrustedDomain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := hbone.VerifyPeer(raw(tc.svid), bundles)
			if !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("VerifyPeer(%s) = %v, want %v", tc.svid.ID, err, tc.want)
			}
			if err == nil && id != tc.svid.ID {
				t.Fatalf("VerifyPeer = %s, want %s", id, tc.svid.ID)
			}
		})
	}
}

// BenchmarkVerifyPeer measures the verification of a peer's certificate
// on a node of one trust domain, and on a node that federates another
// (the peer of the local domain, then of the federated one): the bundle
// lookup federation adds is one comparison and a map read.
func BenchmarkVerifyPeer(b *testing.B) {
	caA := ztest.NewCA(b, "a.test", ca.Options{})
	caB := ztest.NewCA(b, "b.test", ca.Options{})
	fed := federatedBundles(b, caA, caB)
	local, err := caA.Mint(caA.ID("shop", "client"), time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	foreign, err := caB.Mint(caB.ID("shop", "client"), time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name    string
		bundles x509bundle.Source
		svid    *x509svid.SVID
	}{
		{"single-domain", caA.Bundles(), local},
		{"federated/local-peer", fed, local},
		{"federated/foreign-peer", fed, foreign},
	} {
		b.Run(bc.name, func(b *testing.B) {
			chain := raw(bc.svid)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := hbone.VerifyPeer(chain, bc.bundles); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
