package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity/ca"
)

// FuzzSignCSR feeds the CA arbitrary requests (what a cluster CA service
// receives from the network): it must refuse them with ErrBadCSR or mint
// an SVID that go-spiffe accepts, for the request's key and the asked ID.
func FuzzSignCSR(f *testing.F) {
	c, err := ca.New(td, ca.Options{Intermediate: true, Now: fixedClock(t0)})
	if err != nil {
		f.Fatal(err)
	}
	bundle, _ := c.Bundle(context.Background())
	key, err := newKeyF()
	if err != nil {
		f.Fatal(err)
	}
	for _, tmpl := range []*x509.CertificateRequest{
		{},
		{URIs: []*url.URL{podID.URL()}},
		{DNSNames: []string{"cart.shop.svc"}},
	} {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(der)
	}
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		chain, err := c.SignCSR(context.Background(), der, podID, time.Hour)
		if err != nil {
			if !errors.Is(err, ca.ErrBadCSR) {
				t.Fatalf("refused with %v, want ErrBadCSR", err)
			}
			return
		}
		csr, perr := x509.ParseCertificateRequest(der)
		if perr != nil {
			t.Fatalf("signed a request that does not parse: %v", perr)
		}
		leaf := chain[0]
		if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(csr.PublicKey) {
			t.Fatal("leaf certifies another key than the request's")
		}
		if id, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(t0)); err != nil || id != podID {
			t.Fatalf("minted SVID: id %s, verify %v", id, err)
		}
		if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 || len(leaf.URIs) != 1 {
			t.Fatalf("leaf has extra names: %v %v %v %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
		}
	})
}
