package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultFederationPoll is how often a Federation reads its bundle files
// unless told otherwise (a few kilobytes each; parsed only when changed).
const DefaultFederationPoll = 10 * time.Second

// maxBundleFile bounds the size of a federated bundle file.
const maxBundleFile = 1 << 20

// FederatedBundle names the bundle of one foreign trust domain: a file
// holding its root certificates, as PEM or as a SPIFFE trust bundle
// (JWKS, the format of SPIRE's federation endpoint and 'spire-server
// bundle show -format spiffe').
type FederatedBundle struct {
	TrustDomain spiffeid.TrustDomain
	File        string
}

// ParseFederatedBundle parses the value of 'mantlet agent --federate':
// <trust-domain>=<file>.
func ParseFederatedBundle(s string) (FederatedBundle, error) {
	name, file, ok := strings.Cut(s, "=")
	if !ok || name == "" || file == "" {
		return FederatedBundle{}, fmt.Errorf("federate %q: want <trust-domain>=<bundle file>, e.g. b.example=/etc/mantlet/b.example.pem", s)
	}
	if strings.Contains(name, "/") {
		return FederatedBundle{}, fmt.Errorf("federate %q: %q: want a trust domain name such as b.example, not a SPIFFE ID", s, name)
	}
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return FederatedBundle{}, fmt.Errorf("federate %q: trust domain %q: %w", s, name, err)
	}
	return FederatedBundle{TrustDomain: td, File: file}, nil
}

// ErrNotFederated is wrapped by Federation.GetX509BundleForTrustDomain for
// a trust domain it holds no bundle of.
var ErrNotFederated = errors.New("trust domain is not federated")

// Federation holds the trust bundles of foreign trust domains, each read
// from its file and read again when the file changes (Run). Each bundle
// vouches only for IDs of its own trust domain: go-spiffe's verification
// picks the bundle by the trust domain of the certificate's SPIFFE ID.
// A file that cannot be read or parsed leaves its last good bundle in use,
// and is reported (Bundles) and logged. Its methods are safe for
// concurrent use; GetX509BundleForTrustDomain is lock-free.
type Federation struct {
	log     *slog.Logger
	now     func() time.Time
	domains []*federated // sorted by trust domain
	byTD    map[spiffeid.TrustDomain]*federated
}

// federated is one foreign trust domain.
type federated struct {
	td   spiffeid.TrustDomain
	file string
	cur  atomic.Pointer[x509bundle.Bundle]

	mu        sync.Mutex // guards what follows
	raw       []byte     // the file as last read (nil: unreadable)
	changedAt time.Time
	checkedAt time.Time
	reloads   uint64
	failures  int
	lastErr   error
}

// NewFederation reads the bundle of every foreign trust domain in fed.
// local is the node's own trust domain: its bundle comes from the issuer,
// so a federated bundle for it is an error, as are two bundles for one
// domain and a file that cannot be read or holds no certificate (a typo
// fails at start). log may be nil.
func NewFederation(local spiffeid.TrustDomain, fed []FederatedBundle, log *slog.Logger) (*Federation, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &Federation{log: log, now: time.Now, byTD: make(map[spiffeid.TrustDomain]*federated, len(fed))}
	for _, fb := range fed {
		switch {
		case fb.TrustDomain.IsZero() || fb.File == "":
			return nil, errors.New("identity: federation: a bundle needs a trust domain and a file")
		case fb.TrustDomain == local:
			return nil, fmt.Errorf("identity: federation: %s is the node's own trust domain; its bundle comes from the CA, not from a federated file", local.Name())
		case f.byTD[fb.TrustDomain] != nil:
			return nil, fmt.Errorf("identity: federation: trust domain %s is given twice (%s and %s)", fb.TrustDomain.Name(), f.byTD[fb.TrustDomain].file, fb.File)
		}
		d := &federated{td: fb.TrustDomain, file: fb.File}
		if _, err := f.load(d); err != nil {
			return nil, err
		}
		f.byTD[d.td] = d
		f.domains = append(f.domains, d)
	}
	slices.SortFunc(f.domains, func(a, b *federated) int { return a.td.Compare(b.td) })
	return f, nil
}

// TrustDomains returns the federated trust domains, sorted.
func (f *Federation) TrustDomains() []spiffeid.TrustDomain {
	out := make([]spiffeid.TrustDomain, len(f.domains))
	for i, d := range f.domains {
		out[i] = d.td
	}
	return out
}

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source:
// the current bundle of a federated trust domain, or an error wrapping
// ErrNotFederated.
func (f *Federation) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if d := f.byTD[td]; d != nil {
		return d.cur.Load(), nil
	}
	return nil, fmt.Errorf("identity: bundle for %s: %w", td, ErrNotFederated)
}

// Run looks at every bundle file each interval (DefaultFederationPoll
// when not positive) and reads again the ones that changed, until ctx
// ends. It returns nil.
func (f *Federation) Run(ctx context.Context, interval time.Duration) error {
	if len(f.domains) == 0 {
		return nil
	}
	if interval <= 0 {
		interval = DefaultFederationPoll
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			f.Check()
		}
	}
}

// Check reads every bundle file again and puts in force the ones whose
// content changed (a ConfigMap's update included), and reports how many
// bundles changed.
func (f *Federation) Check() int {
	n := 0
	for _, d := range f.domains {
		changed, err := f.load(d)
		if err != nil {
			f.log.Warn("federated trust bundle not read; the last good one stays in use",
				"trust_domain", d.td.Name(), "file", d.file, "error", err)
		}
		if changed {
			n++
		}
	}
	return n
}

// load reads d's file and, if its content changed since the last read,
// puts its bundle in force. It reports whether the bundle changed, and an
// error when the file cannot be read or parsed; the same error twice in a
// row (a file still missing) is returned once. Reading a small file on
// every check costs less than trusting modification times, which a quick
// second write can leave unchanged.
func (f *Federation) load(d *federated) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := f.now()
	d.checkedAt = now
	data, err := readBundleFile(d.file)
	if err == nil && d.raw != nil && bytes.Equal(data, d.raw) {
		return false, nil // as it was: good or bad, nothing new
	}
	d.raw = data
	var b *x509bundle.Bundle
	if err == nil {
		if b, err = ParseBundle(d.td, data); err != nil {
			err = fmt.Errorf("%s: %w", d.file, err)
		}
	}
	if err != nil {
		err = fmt.Errorf("identity: federated bundle of %s: %w", d.td.Name(), err)
		repeated := d.lastErr != nil && d.lastErr.Error() == err.Error()
		d.failures++
		d.lastErr = err
		if repeated {
			return false, nil
		}
		return false, err
	}
	d.failures, d.lastErr = 0, nil
	old := d.cur.Load()
	if old != nil && old.Equal(b) {
		return false, nil
	}
	d.cur.Store(b)
	d.changedAt = now
	if old != nil {
		d.reloads++
	}
	f.log.Info("federated trust bundle in force", "trust_domain", d.td.Name(), "file", d.file,
		"authorities", len(b.X509Authorities()), "reload", old != nil)
	return true, nil
}

// readBundleFile reads a bundle file of at most maxBundleFile bytes.
func readBundleFile(file string) ([]byte, error) {
	fh, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxBundleFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	if len(data) > maxBundleFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", file, maxBundleFile)
	}
	return data, nil
}

// ParseBundle parses the X.509 authorities of td's bundle from PEM
// certificates or a SPIFFE trust bundle (JSON); it fails when there are
// none or one is not a CA certificate.
func ParseBundle(td spiffeid.TrustDomain, data []byte) (*x509bundle.Bundle, error) {
	var b *x509bundle.Bundle
	if t := bytes.TrimSpace(data); len(t) > 0 && t[0] == '{' {
		sb, err := spiffebundle.Parse(td, data)
		if err != nil {
			return nil, fmt.Errorf("SPIFFE bundle: %w", err)
		}
		b = x509bundle.FromX509Authorities(td, sb.X509Authorities())
	} else {
		var err error
		if b, err = x509bundle.Parse(td, data); err != nil {
			return nil, fmt.Errorf("PEM bundle: %w", err)
		}
	}
	if b.Empty() {
		return nil, errors.New("no X.509 authority in it")
	}
	for _, c := range b.X509Authorities() {
		if !c.BasicConstraintsValid || !c.IsCA {
			return nil, fmt.Errorf("certificate %q is not a CA certificate", c.Subject)
		}
	}
	return b, nil
}

// Bundles describes the federated bundles, sorted by trust domain.
func (f *Federation) Bundles() []BundleInfo {
	out := make([]BundleInfo, 0, len(f.domains))
	for _, d := range f.domains {
		d.mu.Lock()
		bi := BundleInfo{TrustDomain: d.td, Federated: true, Source: d.file, ChangedAt: d.changedAt, CheckedAt: d.checkedAt,
			Reloads: d.reloads, Failures: d.failures}
		if d.lastErr != nil {
			bi.LastError = d.lastErr.Error()
		}
		d.mu.Unlock()
		if b := d.cur.Load(); b != nil {
			for _, r := range b.X509Authorities() {
				bi.Roots = append(bi.Roots, RootInfo{Fingerprint: Fingerprint(r), Subject: r.Subject.String(), NotAfter: r.NotAfter})
			}
		}
		out = append(out, bi)
	}
	return out
}

// TrustBundles is the x509bundle.Source a node verifies peers with: its
// own trust domain's bundle from local, the others' from fed. A nil fed
// leaves local alone (the single-domain path).
func TrustBundles(local spiffeid.TrustDomain, own x509bundle.Source, fed *Federation) x509bundle.Source {
	if fed == nil || len(fed.domains) == 0 {
		return own
	}
	return &trustBundles{local: local, own: own, fed: fed}
}

type trustBundles struct {
	local spiffeid.TrustDomain
	own   x509bundle.Source
	fed   *Federation
}

func (t *trustBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td == t.local {
		return t.own.GetX509BundleForTrustDomain(td)
	}
	return t.fed.GetX509BundleForTrustDomain(td)
}
