// Package ca is mantlet's in-process certificate authority: an ECDSA P-256
// root (optionally with an intermediate) that signs certificate requests
// into X509-SVIDs meeting the SPIFFE X509-SVID specification. It keeps its
// keys in memory (New) or in a directory (Init, Load; key files 0600) and
// never generates or returns workload private keys.
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
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Options tune a CA. Zero values select the defaults.
type Options struct {
	// Intermediate makes New and Init create an intermediate certificate
	// under the root that signs the SVIDs; chains then carry it. Load
	// ignores it (the directory says whether there is one).
	Intermediate bool
	// RootTTL is the lifetime of a new root (default 10 years). Load
	// ignores it.
	RootTTL time.Duration
	// MaxSVIDTTL caps SVID lifetimes (default 7 days).
	MaxSVIDTTL time.Duration
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Backdate is how far before "now" certificates start, to tolerate clock
// skew between nodes.
const Backdate = 5 * time.Minute

// Defaults of Options.
const (
	DefaultRootTTL    = 10 * 365 * 24 * time.Hour
	DefaultMaxSVIDTTL = 7 * 24 * time.Hour
)

// CA signs X509-SVIDs for one trust domain. It is safe for concurrent use.
type CA struct {
	td     spiffeid.TrustDomain
	opts   Options
	root   *x509.Certificate
	signer crypto.Signer       // key of the issuing certificate
	issuer *x509.Certificate   // root, or the intermediate
	chain  []*x509.Certificate // intermediates to append to leaves

	rootKey  crypto.Signer
	interKey crypto.Signer // nil without an intermediate
}

// New creates a CA with fresh keys, in memory.
func New(td spiffeid.TrustDomain, opts Options) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("ca: new: empty trust domain")
	}
	opts = opts.withDefaults()
	rootKey, err := newKey()
	if err != nil {
		return nil, fmt.Errorf("ca: generate root key: %w", err)
	}
	now := opts.Now()
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"mantlet"}, CommonName: "mantlet root CA " + td.Name()},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(opts.RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
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
	if o.RootTTL <= 0 {
		o.RootTTL = DefaultRootTTL
	}
	if o.MaxSVIDTTL <= 0 {
		o.MaxSVIDTTL = DefaultMaxSVIDTTL
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func (c *CA) addIntermediate() error {
	key, err := newKey()
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
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
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
	c.signer, c.issuer, c.chain, c.interKey = key, inter, []*x509.Certificate{inter}, key
	return nil
}

// TrustDomain returns the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Root returns the root certificate.
func (c *CA) Root() *x509.Certificate { return c.root }

// Intermediates returns the certificates between the root and the SVIDs the
// CA signs (none, or the intermediate).
func (c *CA) Intermediates() []*x509.Certificate { return slices.Clone(c.chain) }

// Bundle returns the trust bundle (the root) of the CA's trust domain. It
// never fails; the error is there to satisfy identity.Issuer.
func (c *CA) Bundle(context.Context) (*x509bundle.Bundle, error) {
	return x509bundle.FromX509Authorities(c.td, []*x509.Certificate{c.root}), nil
}

// Errors returned by SignCSR.
var (
	// ErrForeignTrustDomain: the requested ID is not in the CA's trust domain.
	ErrForeignTrustDomain = errors.New("identity is not in the CA's trust domain")
	// ErrBadID: the requested ID cannot name a workload (it has no path:
	// the X509-SVID specification reserves path-less IDs for CAs).
	ErrBadID = errors.New("SPIFFE ID has no path")
	// ErrBadCSR: the request does not parse, its signature is wrong, its key
	// is not ECDSA P-256, or it names an identity other than the requested
	// one.
	ErrBadCSR = errors.New("bad certificate request")
	// ErrExpired: the CA's signing certificate has expired.
	ErrExpired = errors.New("CA certificate expired")
)

// SignCSR signs a PKCS#10 request (DER) for id and returns the chain, leaf
// first, without the root. The leaf's only name is id as a URI SAN (a
// request may carry that same URI SAN and nothing else); it is not a CA,
// its key usage is digitalSignature only, its extended key usages are
// serverAuth and clientAuth, it starts Backdate before now (but not before
// the issuing certificate) and lives ttl (a ttl <= 0 or above
// Options.MaxSVIDTTL means MaxSVIDTTL), capped by the issuing certificate's
// expiry. It returns errors wrapping ErrForeignTrustDomain, ErrBadID,
// ErrBadCSR or ErrExpired.
func (c *CA) SignCSR(_ context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("ca: sign %s: %w (%s)", id, ErrForeignTrustDomain, c.td)
	}
	if id.Path() == "" {
		return nil, fmt.Errorf("ca: sign %s: %w", id, ErrBadID)
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
	if len(csr.URIs) > 1 || len(csr.URIs) == 1 && csr.URIs[0].String() != id.String() ||
		len(csr.DNSNames) > 0 || len(csr.IPAddresses) > 0 || len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("ca: sign %s: %w: it asks for other names (URIs %v, DNS %v, IPs %v, emails %v)",
			id, ErrBadCSR, csr.URIs, csr.DNSNames, csr.IPAddresses, csr.EmailAddresses)
	}
	if ttl <= 0 || ttl > c.opts.MaxSVIDTTL {
		ttl = c.opts.MaxSVIDTTL
	}
	now := c.opts.Now()
	if !now.Before(c.issuer.NotAfter) {
		return nil, fmt.Errorf("ca: sign %s: %w on %s", id, ErrExpired, c.issuer.NotAfter.UTC().Format(time.RFC3339))
	}
	notBefore := now.Add(-Backdate)
	if notBefore.Before(c.issuer.NotBefore) {
		notBefore = c.issuer.NotBefore
	}
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
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
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

// newSerial returns a random positive 128-bit serial number.
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
