package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"net"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("cluster.local")
	otherTD = spiffeid.RequireTrustDomainFromString("other.td")
	podID   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	t0      = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
)

var _ identity.Issuer = (*ca.CA)(nil)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := newKeyF()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newKeyF() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

// csrFor makes a DER certificate request signed by key, carrying tmpl's names.
func csrFor(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func newCA(t *testing.T, opts ca.Options) *ca.CA {
	t.Helper()
	c, err := ca.New(td, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var oidKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 15}

func keyUsageCritical(c *x509.Certificate) bool {
	for _, e := range c.Extensions {
		if e.Id.Equal(oidKeyUsage) {
			return e.Critical
		}
	}
	return false
}

func TestMintedLeafMeetsTheX509SVIDSpec(t *testing.T) {
	for _, tc := range []struct {
		name         string
		intermediate bool
		wantChain    int
	}{
		{"signed by the root", false, 1},
		{"signed by an intermediate", true, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCA(t, ca.Options{Intermediate: tc.intermediate, Now: fixedClock(t0)})
			key := newKey(t)
			chain, err := c.SignCSR(context.Background(), csrFor(t, key, nil), podID, 24*time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != tc.wantChain {
				t.Fatalf("chain has %d certificates, want %d (leaf first, no root)", len(chain), tc.wantChain)
			}
			leaf := chain[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != podID.String() {
				t.Errorf("URI SANs = %v, want exactly [%s]", leaf.URIs, podID)
			}
			if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
				t.Errorf("leaf has other SANs: DNS %v IP %v email %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
			}
			if !leaf.BasicConstraintsValid || leaf.IsCA {
				t.Errorf("basic constraints valid=%v CA=%v, want valid and not a CA", leaf.BasicConstraintsValid, leaf.IsCA)
			}
			if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
				t.Errorf("key usage = %b, want digitalSignature only", leaf.KeyUsage)
			}
			if !keyUsageCritical(leaf) {
				t.Error("key usage extension is not critical")
			}
			if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
				t.Errorf("extended key usage = %v, want serverAuth and clientAuth", leaf.ExtKeyUsage)
			}
			if skew := t0.Sub(leaf.NotBefore); skew < time.Minute || skew > 10*time.Minute {
				t.Errorf("NotBefore is %v before issuance, want a few minutes (at most 10)", skew)
			}
			if want := t0.Add(24 * time.Hour); !leaf.NotAfter.Equal(want) {
				t.Errorf("NotAfter = %v, want %v", leaf.NotAfter, want)
			}
			if !key.PublicKey.Equal(leaf.PublicKey) {
				t.Error("leaf does not carry the key of the request")
			}
			for _, s := range chain[1:] {
				if !s.IsCA || s.KeyUsage&x509.KeyUsageCertSign == 0 || s.KeyUsage&x509.KeyUsageDigitalSignature != 0 {
					t.Errorf("intermediate: CA=%v key usage %b, want CA with keyCertSign and no digitalSignature", s.IsCA, s.KeyUsage)
				}
			}
			bundle, err := c.Bundle(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			id, chains, err := x509svid.Verify(chain, bundle, x509svid.WithTime(t0))
			if err != nil {
				t.Fatalf("go-spiffe rejects the SVID: %v", err)
			}
			if id != podID || len(chains) != 1 || len(chains[0]) != tc.wantChain+1 {
				t.Errorf("verified id %s, chains %d (len %d)", id, len(chains), len(chains[0]))
			}
			// go-spiffe's own SVID validation (leaf rules, key match).
			var raw []byte
			for _, c := range chain {
				raw = append(raw, c.Raw...)
			}
			keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
			if _, err := x509svid.ParseRaw(raw, keyDER); err != nil {
				t.Errorf("x509svid.ParseRaw: %v", err)
			}
		})
	}
}

func TestRootIsASigningCertificateForTheTrustDomain(t *testing.T) {
	root := newCA(t, ca.Options{Now: fixedClock(t0)}).Root()
	if !root.IsCA || root.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("root CA=%v key usage %b, want CA with keyCertSign|cRLSign only", root.IsCA, root.KeyUsage)
	}
	if len(root.URIs) != 1 || root.URIs[0].String() != "spiffe://cluster.local" {
		t.Errorf("root URI SANs = %v, want the trust domain's ID without a path", root.URIs)
	}
	if want := t0.Add(ca.DefaultRootTTL); !root.NotAfter.Equal(want) {
		t.Errorf("root NotAfter = %v, want %v", root.NotAfter, want)
	}
}

func TestSVIDLifetime(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    ca.Options
		ttl     time.Duration
		wantTTL time.Duration
	}{
		{"as asked", ca.Options{}, time.Hour, time.Hour},
		{"zero means the cap", ca.Options{}, 0, ca.DefaultMaxSVIDTTL},
		{"capped at MaxSVIDTTL", ca.Options{MaxSVIDTTL: 48 * time.Hour}, 30 * 24 * time.Hour, 48 * time.Hour},
		{"capped by the root's expiry", ca.Options{RootTTL: 2 * time.Hour}, 24 * time.Hour, 2 * time.Hour},
		{"capped by the intermediate's expiry", ca.Options{RootTTL: 3 * time.Hour, Intermediate: true}, 24 * time.Hour, 3 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Now = fixedClock(t0)
			c := newCA(t, tc.opts)
			chain, err := c.SignCSR(context.Background(), csrFor(t, newKey(t), nil), podID, tc.ttl)
			if err != nil {
				t.Fatal(err)
			}
			if got := chain[0].NotAfter.Sub(t0); got != tc.wantTTL {
				t.Errorf("lifetime = %v, want %v", got, tc.wantTTL)
			}
		})
	}
}

func TestSignCSRRejects(t *testing.T) {
	c := newCA(t, ca.Options{Now: fixedClock(t0)})
	key := newKey(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tampered := csrFor(t, key, nil)
	tampered = slices.Clone(tampered)
	tampered[len(tampered)-3] ^= 0xff // inside the signature
	other, _ := url.Parse("spiffe://cluster.local/ns/shop/sa/admin")

	for _, tc := range []struct {
		name string
		csr  []byte
		id   spiffeid.ID
		want error
	}{
		{"an identity of a foreign trust domain", csrFor(t, key, nil), spiffeid.RequireFromString("spiffe://other.td/ns/shop/sa/cart"), ca.ErrForeignTrustDomain},
		{"the trust domain's own ID (no path)", csrFor(t, key, nil), td.ID(), ca.ErrBadID},
		{"bytes that are no request", []byte("hello"), podID, ca.ErrBadCSR},
		{"a request with a broken signature", tampered, podID, ca.ErrBadCSR},
		{"an RSA key", csrFor(t, rsaKey, nil), podID, ca.ErrBadCSR},
		{"a P-384 key", csrFor(t, p384, nil), podID, ca.ErrBadCSR},
		{"a request naming another identity", csrFor(t, key, &x509.CertificateRequest{URIs: []*url.URL{other}}), podID, ca.ErrBadCSR},
		{"a request asking for a DNS name", csrFor(t, key, &x509.CertificateRequest{DNSNames: []string{"cart.shop"}}), podID, ca.ErrBadCSR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.SignCSR(context.Background(), tc.csr, tc.id, time.Hour)
			if !errors.Is(err, tc.want) {
				t.Fatalf("SignCSR = %v, %v; want an error wrapping %q", chain, err, tc.want)
			}
		})
	}

	t.Run("nothing once the CA expired", func(t *testing.T) {
		now := t0
		c := newCA(t, ca.Options{RootTTL: time.Hour, Now: func() time.Time { return now }})
		now = t0.Add(2 * time.Hour)
		if _, err := c.SignCSR(context.Background(), csrFor(t, key, nil), podID, time.Hour); !errors.Is(err, ca.ErrExpired) {
			t.Fatalf("SignCSR = %v, want ErrExpired", err)
		}
	})

	t.Run("a request that names the identity it asks for is fine", func(t *testing.T) {
		if _, err := c.SignCSR(context.Background(), csrFor(t, key, &x509.CertificateRequest{URIs: []*url.URL{podID.URL()}}), podID, time.Hour); err != nil {
			t.Fatal(err)
		}
	})
}

func TestSVIDFailsVerificationAgainstAnotherCA(t *testing.T) {
	c := newCA(t, ca.Options{Now: fixedClock(t0)})
	stranger := newCA(t, ca.Options{Now: fixedClock(t0)})
	chain, err := stranger.SignCSR(context.Background(), csrFor(t, newKey(t), nil), podID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bundle, _ := c.Bundle(context.Background())
	if _, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(t0)); err == nil {
		t.Fatal("an SVID of an unknown CA verified")
	}
	// and against a bundle of another trust domain
	foreign := x509bundle.FromX509Authorities(otherTD, []*x509.Certificate{stranger.Root()})
	if _, _, err := x509svid.Verify(chain, foreign, x509svid.WithTime(t0)); err == nil {
		t.Fatal("an SVID verified against another trust domain's bundle")
	}
}

func TestNewRejectsEmptyTrustDomain(t *testing.T) {
	if _, err := ca.New(spiffeid.TrustDomain{}, ca.Options{}); err == nil {
		t.Fatal("New accepted an empty trust domain")
	}
}

func BenchmarkSignCSR(b *testing.B) {
	c, err := ca.New(td, ca.Options{Intermediate: true})
	if err != nil {
		b.Fatal(err)
	}
	key, err := newKeyF()
	if err != nil {
		b.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.SignCSR(context.Background(), csr, podID, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSignCSRWithNamesAddsDNSAndIPSANsBesideTheSPIFFEID(t *testing.T) {
	c := newCA(t, ca.Options{Intermediate: true, Now: fixedClock(t0)})
	key := newKey(t)
	names := ca.Names{DNSNames: []string{"cart.shop.svc", "localhost"}, IPAddresses: []net.IP{net.ParseIP("198.19.1.10").To4(), net.ParseIP("2001:db8::1")}}
	for _, tc := range []struct {
		name string
		req  *x509.CertificateRequest
	}{
		{"a request without names", nil},
		{"a request naming some of them", &x509.CertificateRequest{URIs: []*url.URL{podID.URL()}, DNSNames: []string{"localhost"}, IPAddresses: names.IPAddresses[:1]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.SignCSRWithNames(context.Background(), csrFor(t, key, tc.req), podID, time.Hour, names)
			if err != nil {
				t.Fatal(err)
			}
			leaf := chain[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != podID.String() {
				t.Errorf("URI SANs %v", leaf.URIs)
			}
			if !slices.Equal(leaf.DNSNames, names.DNSNames) || len(leaf.IPAddresses) != 2 {
				t.Errorf("DNS %v IP %v", leaf.DNSNames, leaf.IPAddresses)
			}
			b, _ := c.Bundle(context.Background())
			if _, _, err := x509svid.Verify(chain, b, x509svid.WithTime(t0)); err != nil {
				t.Errorf("go-spiffe refuses it: %v", err)
			}
			// An ordinary TLS client verifying a host name or an address.
			pool := x509.NewCertPool()
			pool.AddCert(c.Root())
			inter := x509.NewCertPool()
			inter.AddCert(chain[1])
			for _, host := range []string{"cart.shop.svc", "198.19.1.10", "2001:db8::1"} {
				if _, err := leaf.Verify(x509.VerifyOptions{DNSName: host, Roots: pool, Intermediates: inter, CurrentTime: t0}); err != nil {
					t.Errorf("verify as %s: %v", host, err)
				}
			}
		})
	}
	for _, tc := range []struct {
		name  string
		req   *x509.CertificateRequest
		names ca.Names
		want  error
	}{
		{"a request asking for a name not granted", &x509.CertificateRequest{DNSNames: []string{"admin.shop.svc"}}, names, ca.ErrBadCSR},
		{"a wildcard", nil, ca.Names{DNSNames: []string{"*.shop.svc"}}, ca.ErrBadNames},
		{"upper case", nil, ca.Names{DNSNames: []string{"Cart.shop"}}, ca.ErrBadNames},
		{"an empty label", nil, ca.Names{DNSNames: []string{"cart..shop"}}, ca.ErrBadNames},
		{"a hyphen at a label's end", nil, ca.Names{DNSNames: []string{"cart-.shop"}}, ca.ErrBadNames},
		{"a name twice", nil, ca.Names{DNSNames: []string{"a", "a"}}, ca.ErrBadNames},
		{"a malformed address", nil, ca.Names{IPAddresses: []net.IP{{1, 2, 3}}}, ca.ErrBadNames},
	} {
		t.Run("refused: "+tc.name, func(t *testing.T) {
			if _, err := c.SignCSRWithNames(context.Background(), csrFor(t, key, tc.req), podID, time.Hour, tc.names); !errors.Is(err, tc.want) {
				t.Fatalf("= %v, want %v", err, tc.want)
			}
		})
	}
}
