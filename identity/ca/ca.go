// Package ca is mantlet's in-process certificate authority: an ECDSA P-256
// root (optionally with an intermediate) that signs certificate requests
// into X509-SVIDs meeting the SPIFFE X509-SVID specification. It keeps its
// keys in memory or in a directory (key files 0600) and never generates or
// returns workload private keys.
package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Options tune a new CA.
type Options struct {
	// Intermediate makes the CA sign SVIDs with an intermediate certificate
	// under the root; chains then carry the intermediate.
	Intermediate bool
	// RootTTL is the root's lifetime (default 10 years).
	RootTTL time.Duration
	// MaxSVIDTTL caps SVID lifetimes (default 7 days).
	MaxSVIDTTL time.Duration
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Backdate is how far before "now" certificates start, to tolerate clock
// skew between nodes.
const Backdate = 5 * time.Minute

// CA signs X509-SVIDs for one trust domain.
type CA struct {
	td     spiffeid.TrustDomain
	opts   Options
	root   *x509.Certificate
	signer crypto.Signer       // key of the issuing certificate
	issuer *x509.Certificate   // root, or the intermediate
	chain  []*x509.Certificate // intermediates to append to leaves

	rootKey crypto.Signer
}

// New creates a CA with fresh keys, in memory.
func New(td spiffeid.TrustDomain, opts Options) (*CA, error) {
	opts = opts.withDefaults()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate root key: %w", err)
	}
	now := opts.Now()
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"mantlet"}, CommonName: "mantlet root CA " + td.Name()},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(opts.RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	root, err := selfSign(rootTmpl, rootKey)
	if err != nil {
		return nil, err
	}
	c := &CA{td: td, opts: opts, root: root, rootKey: rootKey, signer: rootKey, issuer: root}
	if opts.Intermediate {
		if err := c.addIntermediate(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (o Options) withDefaults() Options {
	if o.RootTTL == 0 {
		o.RootTTL = 10 * 365 * 24 * time.Hour
	}
	if o.MaxSVIDTTL == 0 {
		o.MaxSVIDTTL = 7 * 24 * time.Hour
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

func (c *CA) addIntermediate() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("ca: generate intermediate key: %w", err)
	}
	now := c.opts.Now()
	serial, err := newSerial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"mantlet"}, CommonName: "mantlet intermediate CA " + c.td.Name()},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              c.root.NotAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		URIs:                  []*url.URL{c.td.ID().URL()},
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.root, &key.PublicKey, c.rootKey)
	if err != nil {
		return fmt.Errorf("ca: sign intermediate: %w", err)
	}
	inter, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("ca: parse intermediate: %w", err)
	}
	c.signer, c.issuer, c.chain = key, inter, []*x509.Certificate{inter}
	return nil
}

// TrustDomain returns the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Root returns the root certificate.
func (c *CA) Root() *x509.Certificate { return c.root }

// Bundle returns the trust bundle (the root) of the CA's trust domain.
func (c *CA) Bundle(context.Context) (*x509bundle.Bundle, error) {
	return x509bundle.FromX509Authorities(c.td, []*x509.Certificate{c.root}), nil
}

// Errors returned by SignCSR.
var (
	// ErrForeignTrustDomain: the requested ID is not in the CA's trust domain.
	ErrForeignTrustDomain = errors.New("identity is not in the CA's trust domain")
	// ErrBadCSR: the request does not parse, its signature is wrong, or its
	// key is not ECDSA P-256.
	ErrBadCSR = errors.New("bad certificate request")
)

// SignCSR signs a PKCS#10 request (DER) for id and returns the chain, leaf
// first, without the root. The leaf's only name is id as a URI SAN; its
// lifetime is ttl capped by Options.MaxSVIDTTL and by the issuer's own
// expiry. It returns errors wrapping ErrForeignTrustDomain or ErrBadCSR.
func (c *CA) SignCSR(_ context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("ca: sign %s: %w (%s)", id, ErrForeignTrustDomain, c.td)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w: %w", id, ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w: signature: %w", id, ErrBadCSR, err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("ca: sign %s: %w: key is not ECDSA P-256", id, ErrBadCSR)
	}
	if ttl <= 0 || ttl > c.opts.MaxSVIDTTL {
		ttl = c.opts.MaxSVIDTTL
	}
	now := c.opts.Now()
	notAfter := now.Add(ttl)
	if notAfter.After(c.issuer.NotAfter) {
		notAfter = c.issuer.NotAfter
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"mantlet"}},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
		SubjectKeyId:          keyID(pub),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.issuer, pub, c.signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: parse leaf: %w", id, err)
	}
	return append([]*x509.Certificate{leaf}, c.chain...), nil
}

func selfSign(tmpl *x509.Certificate, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.SubjectKeyId = keyID(&key.PublicKey)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("ca: self-sign root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse root: %w", err)
	}
	return cert, nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("ca: serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func keyID(pub *ecdsa.PublicKey) []byte {
	der, _ := x509.MarshalPKIXPublicKey(pub)
	sum := sha256.Sum256(der)
	return sum[:20]
}
