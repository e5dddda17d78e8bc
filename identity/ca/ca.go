// Package ca is mantlet's certificate authority: an ECDSA P-256 root
// (optionally with an intermediate) that signs certificate requests into
// X509-SVIDs meeting the SPIFFE X509-SVID specification. It keeps its keys
// in memory (New), in a directory (Init, Load; key files 0600) or in any
// store of named files such as a Kubernetes Secret (Files, Parse), follows
// a directory that changes under it (OpenDir), and rotates its root with an
// overlap (Prepare, Activate, Finish). It never generates or returns
// workload private keys.
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
	"net"
	"net/url"
	"slices"
	"strings"
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

// CA signs X509-SVIDs for one trust domain. It is safe for concurrent use;
// the rotation steps return a new CA and leave the receiver as it was.
type CA struct {
	td     spiffeid.TrustDomain
	opts   Options
	active authority
	// roots is the trust bundle: the active root first, then the other
	// roots still trusted (the next one while a rotation is prepared, the
	// previous one until it is finished).
	roots []*x509.Certificate
	// next is the authority a prepared rotation will activate; nil
	// otherwise.
	next *authority
	// created is when the CA was first made (kept across rotations).
	created time.Time
}

// authority is one root and, optionally, the intermediate under it that
// signs.
type authority struct {
	root     *x509.Certificate
	rootKey  crypto.Signer
	inter    *x509.Certificate // nil without an intermediate
	interKey crypto.Signer
}

// signer returns the certificate that signs SVIDs and its key.
func (a *authority) signer() (*x509.Certificate, crypto.Signer) {
	if a.inter != nil {
		return a.inter, a.interKey
	}
	return a.root, a.rootKey
}

// chain returns the certificates to append to leaves.
func (a *authority) chain() []*x509.Certificate {
	if a.inter != nil {
		return []*x509.Certificate{a.inter}
	}
	return nil
}

// New creates a CA with fresh keys, in memory.
func New(td spiffeid.TrustDomain, opts Options) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("ca: new: empty trust domain")
	}
	opts = opts.withDefaults()
	a, err := newAuthority(td, opts, opts.Intermediate)
	if err != nil {
		return nil, err
	}
	return &CA{td: td, opts: opts, active: *a, roots: []*x509.Certificate{a.root}, created: opts.Now()}, nil
}

// newAuthority makes a fresh root, and an intermediate under it when
// intermediate is set.
func newAuthority(td spiffeid.TrustDomain, opts Options, intermediate bool) (*authority, error) {
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
	a := &authority{root: root, rootKey: rootKey}
	if intermediate {
		if err := a.addIntermediate(td, opts.Now()); err != nil {
			return nil, err
		}
	}
	return a, nil
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

func (a *authority) addIntermediate(td spiffeid.TrustDomain, now time.Time) error {
	key, err := newKey()
	if err != nil {
		return fmt.Errorf("ca: generate intermediate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"mantlet"}, CommonName: "mantlet intermediate CA " + td.Name()},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              a.root.NotAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		URIs:                  []*url.URL{td.ID().URL()},
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.root, &key.PublicKey, a.rootKey)
	if err != nil {
		return fmt.Errorf("ca: sign intermediate: %w", err)
	}
	inter, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("ca: parse intermediate: %w", err)
	}
	a.inter, a.interKey = inter, key
	return nil
}

// TrustDomain returns the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Root returns the active root certificate: the one the SVIDs the CA signs
// now chain to.
func (c *CA) Root() *x509.Certificate { return c.active.root }

// SigningRoot is Root for the identity package's SigningRooter: the
// Manager renews SVIDs of other roots early once a rotation activated a
// new root. It never fails.
func (c *CA) SigningRoot(context.Context) (*x509.Certificate, error) { return c.active.root, nil }

// Roots returns the trust bundle's roots: the active root first, then the
// others still trusted during a rotation.
func (c *CA) Roots() []*x509.Certificate { return slices.Clone(c.roots) }

// Intermediates returns the certificates between the root and the SVIDs the
// CA signs (none, or the intermediate).
func (c *CA) Intermediates() []*x509.Certificate { return c.active.chain() }

// Bundle returns the trust bundle of the CA's trust domain: every root in
// Roots. It never fails; the error is there to satisfy identity.Issuer.
func (c *CA) Bundle(context.Context) (*x509bundle.Bundle, error) {
	return x509bundle.FromX509Authorities(c.td, c.roots), nil
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
	// ErrBadNames: DNS or IP names asked for beside the SPIFFE ID are
	// badly formed.
	ErrBadNames = errors.New("bad DNS or IP names")
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
func (c *CA) SignCSR(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	return c.SignCSRWithNames(ctx, csrDER, id, ttl, Names{})
}

// Names are host names and addresses a certificate carries beside its
// SPIFFE ID, so that ordinary TLS clients, which verify a host name or an
// address, accept it. The X509-SVID specification allows them; mantlet's
// workloads never ask for them.
type Names struct {
	DNSNames    []string
	IPAddresses []net.IP
}

// Check says whether the names are well formed: DNS names in lower case,
// of letters, digits and hyphens, at most 253 characters, labels of at
// most 63, no wildcards; addresses IPv4 or IPv6, no duplicates.
func (n Names) Check() error {
	seen := map[string]bool{}
	for _, d := range n.DNSNames {
		if err := checkDNSName(d); err != nil {
			return err
		}
		if seen[d] {
			return fmt.Errorf("DNS name %q given twice", d)
		}
		seen[d] = true
	}
	for _, ip := range n.IPAddresses {
		if len(ip) != net.IPv4len && len(ip) != net.IPv6len {
			return fmt.Errorf("IP address %v is not IPv4 or IPv6", []byte(ip))
		}
		if seen[ip.String()] {
			return fmt.Errorf("IP address %s given twice", ip)
		}
		seen[ip.String()] = true
	}
	return nil
}

func checkDNSName(d string) error {
	if d == "" || len(d) > 253 {
		return fmt.Errorf("DNS name %q: want 1 to 253 characters", d)
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("DNS name %q: a label is empty or longer than 63 characters", d)
		}
		for i, r := range label {
			ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' && i > 0 && i < len(label)-1
			if !ok {
				return fmt.Errorf("DNS name %q: want lower-case letters, digits and inner hyphens", d)
			}
		}
	}
	return nil
}

// SignCSRWithNames is SignCSR for a certificate that also carries names
// (DNS and IP SANs) beside the SPIFFE ID. The request may name the same
// SPIFFE ID and any of these names, nothing else; the leaf carries exactly
// id and names. Badly formed names give an error wrapping ErrBadNames.
func (c *CA) SignCSRWithNames(_ context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration, names Names) ([]*x509.Certificate, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("ca: sign %s: %w (%s)", id, ErrForeignTrustDomain, c.td)
	}
	if id.Path() == "" {
		return nil, fmt.Errorf("ca: sign %s: %w", id, ErrBadID)
	}
	if err := names.Check(); err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w: %w", id, ErrBadNames, err)
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
		!subset(csr.DNSNames, names.DNSNames, func(a, b string) bool { return a == b }) ||
		!subset(csr.IPAddresses, names.IPAddresses, net.IP.Equal) || len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("ca: sign %s: %w: it asks for other names (URIs %v, DNS %v, IPs %v, emails %v)",
			id, ErrBadCSR, csr.URIs, csr.DNSNames, csr.IPAddresses, csr.EmailAddresses)
	}
	if ttl <= 0 || ttl > c.opts.MaxSVIDTTL {
		ttl = c.opts.MaxSVIDTTL
	}
	issuer, signer := c.active.signer()
	now := c.opts.Now()
	if !now.Before(issuer.NotAfter) {
		return nil, fmt.Errorf("ca: sign %s: %w on %s", id, ErrExpired, issuer.NotAfter.UTC().Format(time.RFC3339))
	}
	notBefore := now.Add(-Backdate)
	if notBefore.Before(issuer.NotBefore) {
		notBefore = issuer.NotBefore
	}
	notAfter := now.Add(ttl)
	if notAfter.After(issuer.NotAfter) {
		notAfter = issuer.NotAfter
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
		DNSNames:              names.DNSNames,
		IPAddresses:           names.IPAddresses,
		SubjectKeyId:          keyID(pub),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: parse leaf: %w", id, err)
	}
	return append([]*x509.Certificate{leaf}, c.active.chain()...), nil
}

// subset says whether every element of got is in allowed.
func subset[T any](got, allowed []T, eq func(a, b T) bool) bool {
	for _, g := range got {
		if !slices.ContainsFunc(allowed, func(a T) bool { return eq(g, a) }) {
			return false
		}
	}
	return true
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
