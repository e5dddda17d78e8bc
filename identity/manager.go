package identity

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Defaults of ManagerOptions.
const (
	DefaultJitter        = 0.1
	DefaultMinBackoff    = time.Second
	DefaultMaxBackoff    = 2 * time.Minute
	DefaultBundleRefresh = 10 * time.Second
	DefaultFetchTimeout  = 30 * time.Second
	DefaultReissueSpread = time.Minute
)

// ManagerOptions tune a Manager. Zero values select the defaults.
type ManagerOptions struct {
	// TTL is the lifetime asked of the issuer for every SVID (default
	// DefaultSVIDTTL, 24h). The issuer may grant less.
	TTL time.Duration
	// Jitter spreads renewals: an SVID is renewed at half its lifetime plus
	// or minus up to Jitter times its lifetime, uniformly (default 0.1, so
	// between 40% and 60% of the lifetime). Negative means no jitter; at
	// most 0.4.
	Jitter float64
	// MinBackoff is the wait after the first failed attempt to get an
	// SVID; each further failure doubles it, up to MaxBackoff (defaults 1s
	// and 2m).
	MinBackoff, MaxBackoff time.Duration
	// BundleRefresh is how often Run fetches the trust bundle (and, from a
	// SigningRooter, the signing root) again (default 10s: issuers answer
	// from memory or a local file).
	BundleRefresh time.Duration
	// ReissueSpread bounds how long after a change of the issuer's signing
	// root (a root rotation) the SVIDs held under another root are all
	// renewed: each at a random moment within it (default 1m).
	ReissueSpread time.Duration
	// FetchTimeout bounds one call to the issuer (default 30s).
	FetchTimeout time.Duration
	// Clock is the time source (default the system clock).
	Clock Clock
	// OnIssue, if set, is called after every attempt to get an SVID from
	// the issuer, first fetch or renewal, with its outcome (for metrics).
	// It must not block and must not call the Manager.
	OnIssue func(id spiffeid.ID, err error)
}

func (o ManagerOptions) withDefaults() ManagerOptions {
	if o.TTL <= 0 {
		o.TTL = DefaultSVIDTTL
	}
	switch {
	case o.Jitter == 0:
		o.Jitter = DefaultJitter
	case o.Jitter < 0:
		o.Jitter = 0
	case o.Jitter > 0.4:
		o.Jitter = 0.4
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = DefaultMinBackoff
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	o.MaxBackoff = max(o.MaxBackoff, o.MinBackoff)
	if o.BundleRefresh <= 0 {
		o.BundleRefresh = DefaultBundleRefresh
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = DefaultFetchTimeout
	}
	if o.ReissueSpread <= 0 {
		o.ReissueSpread = DefaultReissueSpread
	}
	if o.Clock == nil {
		o.Clock = systemClock{}
	}
	return o
}

// Errors of a Manager.
var (
	// ErrUnknownTrustDomain: an identity or bundle of a trust domain other
	// than the Manager's was asked for.
	ErrUnknownTrustDomain = errors.New("trust domain is not the node's")
	// ErrUnavailable: there is no valid SVID for the identity because the
	// issuer failed (the error also wraps the issuer's error). It happens
	// on a failed first fetch, and when renewals kept failing until the
	// last SVID expired.
	ErrUnavailable = errors.New("no valid SVID")
)

// Manager keeps one X509-SVID per local identity of a node: it fetches an
// SVID on first need (or ahead, with Prefetch), renews it at half its
// lifetime with jitter, retries failures with exponential backoff, and
// keeps the trust bundle current. Private keys (ECDSA P-256) are made by
// the Manager; only certificate requests go to the Issuer.
//
// While renewals fail, the last SVID is served until it expires; after
// that SVID returns an error wrapping ErrUnavailable until the issuer
// answers again. Renewals and bundle refreshes happen only while Run runs;
// SVID, Prefetch and the Source adapters work without it.
//
// A Manager is safe for concurrent use. Returned SVIDs and bundles are
// shared: do not modify them.
type Manager struct {
	issuer Issuer
	td     spiffeid.TrustDomain
	log    *slog.Logger
	opts   ManagerOptions
	clock  Clock

	running atomic.Bool
	kick    chan struct{} // wakes Run; capacity 1

	mu             sync.Mutex
	entries        map[spiffeid.ID]*entry
	bundle         *x509bundle.Bundle
	bundleNext     time.Time // when Run fetches the bundle again
	bundleFailures int
	bundleFetching bool
	bundleChanged  time.Time // when the bundle last changed
	bundleChecked  time.Time // when the bundle was last fetched
	bundleErr      error     // error of the last refresh, nil after a success
	signingRoot    *x509.Certificate
}

// entry is the state of one identity. Fields are guarded by Manager.mu.
type entry struct {
	id       spiffeid.ID
	svid     *x509svid.SVID    // current SVID; nil before the first success
	tlsCert  *tls.Certificate  // svid as a TLS certificate
	issuedAt time.Time         // when svid arrived
	renewAt  time.Time         // next renewal, or retry after a failure
	failures int               // consecutive failed attempts
	lastErr  error             // error of the last attempt, nil after a success
	fetching chan struct{}     // non-nil while an attempt runs; closed when it ends
	root     *x509.Certificate // the root svid chains to
	reissue  bool              // renewal brought forward: svid's root no longer signs
	stale    bool              // the issuer reported a newer SVID during the attempt
}

// NewManager returns a Manager for the identities of trust domain td,
// signed by issuer.
func NewManager(issuer Issuer, td spiffeid.TrustDomain, log *slog.Logger, opts ManagerOptions) *Manager {
	opts = opts.withDefaults()
	m := &Manager{
		issuer:  issuer,
		td:      td,
		log:     log,
		opts:    opts,
		clock:   opts.Clock,
		kick:    make(chan struct{}, 1),
		entries: map[spiffeid.ID]*entry{},
	}
	if si, ok := issuer.(SVIDIssuer); ok {
		si.Notify(m.issuerUpdated)
	}
	return m
}

// TrustDomain returns the trust domain of the Manager's identities.
func (m *Manager) TrustDomain() spiffeid.TrustDomain { return m.td }

// Run renews SVIDs and refreshes the trust bundle until ctx is done, then
// waits for the attempts it started and returns nil. It returns an error
// at once if another Run is active.
func (m *Manager) Run(ctx context.Context) error {
	if !m.running.CompareAndSwap(false, true) {
		return errors.New("identity: manager: Run is already running")
	}
	defer m.running.Store(false)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		t := m.clock.TimerAt(m.startDue(ctx, &wg))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C():
		case <-m.kick:
			t.Stop()
		}
	}
}

// startDue starts the renewals and the bundle refresh that are due and
// returns when the next one is.
func (m *Manager) startDue(ctx context.Context, wg *sync.WaitGroup) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	next := now.Add(m.opts.BundleRefresh)
	if !m.bundleFetching {
		if !now.Before(m.bundleNext) {
			m.bundleFetching = true
			wg.Go(func() { m.refreshBundle(ctx, now) })
		} else if m.bundleNext.Before(next) {
			next = m.bundleNext
		}
	}
	for _, e := range m.entries {
		if e.fetching != nil {
			continue
		}
		if !now.Before(e.renewAt) {
			m.startFetch(ctx, e, wg)
			continue
		}
		if e.renewAt.Before(next) {
			next = e.renewAt
		}
	}
	return next
}

func (m *Manager) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// SVID returns the current SVID for id, fetching it first if there is
// none; concurrent callers share one fetch. Once fetched, id is kept and
// renewed (by Run) until Forget. An error wraps ErrUnknownTrustDomain for
// an id of another trust domain, ErrUnavailable when the issuer failed
// (after a failure, calls within the backoff fail at once without asking
// the issuer again), or ctx's error.
func (m *Manager) SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	e, err := m.ready(ctx, id)
	if err != nil {
		return nil, err
	}
	return e.svid, nil
}

// TLSCertificate is SVID as a tls.Certificate (chain leaf first, private
// key, parsed leaf), made once per SVID.
func (m *Manager) TLSCertificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	e, err := m.ready(ctx, id)
	if err != nil {
		return nil, err
	}
	return e.tlsCert, nil
}

// ready returns a snapshot of id's entry that holds a valid SVID.
func (m *Manager) ready(ctx context.Context, id spiffeid.ID) (entry, error) {
	if !id.MemberOf(m.td) {
		return entry{}, fmt.Errorf("identity: SVID for %s: %w (%s)", id, ErrUnknownTrustDomain, m.td)
	}
	m.mu.Lock()
	e := m.entryLocked(id)
	if snap, ok := m.validLocked(e); ok {
		m.mu.Unlock()
		return snap, nil
	}
	if e.fetching == nil {
		if e.lastErr != nil && m.clock.Now().Before(e.renewAt) {
			err := m.unavailableLocked(e)
			m.mu.Unlock()
			return entry{}, err
		}
		m.startFetch(context.WithoutCancel(ctx), e, nil)
	}
	done := e.fetching
	m.mu.Unlock()

	select {
	case <-done:
	case <-ctx.Done():
		return entry{}, fmt.Errorf("identity: SVID for %s: %w", id, ctx.Err())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if snap, ok := m.validLocked(e); ok {
		return snap, nil
	}
	return entry{}, m.unavailableLocked(e)
}

// entryLocked returns id's entry, creating an empty one.
func (m *Manager) entryLocked(id spiffeid.ID) *entry {
	e := m.entries[id]
	if e == nil {
		e = &entry{id: id}
		m.entries[id] = e
	}
	return e
}

func (m *Manager) validLocked(e *entry) (entry, bool) {
	if e.svid == nil || !m.clock.Now().Before(e.svid.Certificates[0].NotAfter) {
		return entry{}, false
	}
	return entry{id: e.id, svid: e.svid, tlsCert: e.tlsCert}, true
}

func (m *Manager) unavailableLocked(e *entry) error {
	what := "no SVID yet"
	if e.svid != nil {
		what = "the last SVID expired at " + e.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339)
	}
	err := e.lastErr
	if err == nil {
		err = errors.New("no attempt finished")
	}
	return fmt.Errorf("identity: SVID for %s: %w: %s, %d failed attempts, next in %s: %w",
		e.id, ErrUnavailable, what, e.failures, e.renewAt.Sub(m.clock.Now()).Round(time.Millisecond), err)
}

// Prefetch starts fetching an SVID for id in the background if the
// Manager has none, typically when a workload with this identity appears
// on the node. An id of another trust domain is ignored (and logged).
func (m *Manager) Prefetch(id spiffeid.ID) {
	if !id.MemberOf(m.td) {
		m.log.Warn("not prefetching an SVID of a foreign trust domain", "spiffe_id", id.String(), "trust_domain", m.td.Name())
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.entries[id]; ok {
		return
	}
	m.startFetch(context.Background(), m.entryLocked(id), nil)
}

// Forget drops id and its SVID, typically when the node's last workload
// with this identity goes. A fetch in flight finishes but is not kept.
func (m *Manager) Forget(id spiffeid.ID) {
	m.mu.Lock()
	delete(m.entries, id)
	m.mu.Unlock()
	if si, ok := m.issuer.(SVIDIssuer); ok {
		si.Release(id)
	}
}

// startFetch starts an attempt to get an SVID for e. wg, if not nil,
// tracks it. Called with m.mu held and e.fetching nil.
func (m *Manager) startFetch(ctx context.Context, e *entry, wg *sync.WaitGroup) {
	e.fetching = make(chan struct{})
	f := func() {
		ctx, cancel := context.WithTimeout(ctx, m.opts.FetchTimeout)
		defer cancel()
		m.fetch(ctx, e)
	}
	if wg != nil {
		wg.Go(f)
	} else {
		go f()
	}
}

func (m *Manager) fetch(ctx context.Context, e *entry) {
	svid, root, err := m.issue(ctx, e.id)
	var cert *tls.Certificate
	if err == nil {
		cert = tlsCertificate(svid)
	}
	m.mu.Lock()
	now := m.clock.Now()
	if err == nil {
		if !now.Before(svid.Certificates[0].NotAfter) {
			err = fmt.Errorf("identity: SVID for %s: issuer returned a certificate that expired at %s", e.id, svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
		}
	}
	// An issuer that renews on its own may answer with the SVID the
	// Manager has: not renewed yet, so ask again at half what is left.
	unchanged := err == nil && e.svid != nil && e.svid.Certificates[0].Equal(svid.Certificates[0])
	var retry time.Duration
	canceled := err != nil && errors.Is(ctx.Err(), context.Canceled)
	switch {
	case canceled: // Run is stopping: not a failure, retry when it runs again
		e.renewAt = now
	case unchanged:
		e.renewAt = now.Add(max(m.renewAfter(svid.Certificates[0].NotAfter.Sub(now)), m.opts.MinBackoff))
		e.failures, e.lastErr = 0, nil
	case err == nil:
		lifetime := svid.Certificates[0].NotAfter.Sub(now)
		e.svid, e.tlsCert, e.issuedAt, e.root = svid, cert, now, root
		e.renewAt = now.Add(m.renewAfter(lifetime))
		e.failures, e.lastErr, e.reissue = 0, nil, false
	default:
		e.failures++
		e.lastErr = err
		retry = m.backoff(e.failures)
		e.renewAt = now.Add(retry)
	}
	if e.stale {
		e.stale, e.renewAt = false, now
	}
	renewAt, failures := e.renewAt, e.failures
	close(e.fetching)
	e.fetching = nil
	m.mu.Unlock()
	m.wake()

	switch {
	case canceled:
		return
	case unchanged:
		m.log.Debug("SVID not renewed by the issuer yet", "spiffe_id", e.id.String(), "serial", serialHex(svid.Certificates[0]), "ask_again_at", renewAt)
		return
	case err == nil:
		m.log.Info("SVID issued", "spiffe_id", e.id.String(), "serial", serialHex(svid.Certificates[0]),
			"not_after", svid.Certificates[0].NotAfter, "renew_at", renewAt)
	default:
		m.log.Warn("SVID fetch failed", "spiffe_id", e.id.String(), "failures", failures, "retry_in", retry, "error", err)
	}
	if m.opts.OnIssue != nil {
		m.opts.OnIssue(e.id, err)
	}
}

// renewAfter is when, after receipt, an SVID of the given remaining
// lifetime is renewed: at half of it, plus or minus the jitter.
func (m *Manager) renewAfter(lifetime time.Duration) time.Duration {
	f := 0.5 + m.opts.Jitter*(2*mrand.Float64()-1)
	return time.Duration(float64(lifetime) * f)
}

// backoff is the wait after the n-th consecutive failure (n >= 1):
// MinBackoff doubled n-1 times, at most MaxBackoff.
func (m *Manager) backoff(n int) time.Duration {
	d := m.opts.MinBackoff
	for i := 1; i < n && d < m.opts.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, m.opts.MaxBackoff)
}

// issue makes a key and a request, has the issuer sign it, and checks the
// answer: an SVID for id that chains to the trust bundle. It returns the
// SVID and the root it chains to.
func (m *Manager) issue(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, *x509.Certificate, error) {
	if si, ok := m.issuer.(SVIDIssuer); ok {
		return m.issueWhole(ctx, si, id)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: SVID for %s: generate key: %w", id, err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: SVID for %s: certificate request: %w", id, err)
	}
	chain, err := m.issuer.SignCSR(ctx, csr, id, m.opts.TTL)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer: %w", id, err)
	}
	if len(chain) == 0 {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned no certificate", id)
	}
	if !key.PublicKey.Equal(chain[0].PublicKey) {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned a certificate for another key", id)
	}
	root, err := m.verify(ctx, chain, id)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: SVID for %s: issuer returned an unusable certificate: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, root, nil
}

// verify checks chain as a peer would: an X509-SVID for id that chains to
// the trust bundle; it returns the root it chains to. When it does not,
// the bundle is fetched again once (the CA may have rotated).
func (m *Manager) verify(ctx context.Context, chain []*x509.Certificate, id spiffeid.ID) (*x509.Certificate, error) {
	b, err := m.currentBundle(ctx)
	if err != nil {
		return nil, err
	}
	now := x509svid.WithTime(m.clock.Now())
	got, chains, err := x509svid.Verify(chain, b, now)
	if err != nil {
		if b, err = m.fetchBundle(ctx); err != nil {
			return nil, err
		}
		if got, chains, err = x509svid.Verify(chain, b, now); err != nil {
			return nil, err
		}
	}
	if got != id {
		return nil, fmt.Errorf("it names %s", got)
	}
	verified := chains[0]
	return verified[len(verified)-1], nil
}

// Source returns a go-spiffe x509svid.Source that serves the SVID of id,
// waiting at most FetchTimeout for one.
func (m *Manager) Source(id spiffeid.ID) x509svid.Source { return svidSource{m, id} }

type svidSource struct {
	m  *Manager
	id spiffeid.ID
}

func (s svidSource) GetX509SVID() (*x509svid.SVID, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.m.opts.FetchTimeout)
	defer cancel()
	return s.m.SVID(ctx, s.id)
}

// Bundle returns the trust bundle of the Manager's trust domain, fetching
// it from the issuer if the Manager has none yet.
func (m *Manager) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	return m.currentBundle(ctx)
}

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source: the
// trust bundle for td, which must be the Manager's trust domain (else the
// error wraps ErrUnknownTrustDomain). It waits at most FetchTimeout when
// the bundle has not been fetched yet.
func (m *Manager) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != m.td {
		return nil, fmt.Errorf("identity: bundle for %s: %w (%s)", td, ErrUnknownTrustDomain, m.td)
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.FetchTimeout)
	defer cancel()
	return m.currentBundle(ctx)
}

func (m *Manager) currentBundle(ctx context.Context) (*x509bundle.Bundle, error) {
	m.mu.Lock()
	b := m.bundle
	m.mu.Unlock()
	if b != nil {
		return b, nil
	}
	return m.fetchBundle(ctx)
}

// fetchBundle asks the issuer for the bundle and keeps it.
func (m *Manager) fetchBundle(ctx context.Context) (*x509bundle.Bundle, error) {
	b, err := m.issuer.Bundle(ctx)
	switch {
	case err != nil:
		return nil, fmt.Errorf("identity: bundle of %s: %w", m.td, err)
	case b == nil || b.Empty():
		return nil, fmt.Errorf("identity: bundle of %s: issuer returned an empty bundle", m.td)
	case b.TrustDomain() != m.td:
		return nil, fmt.Errorf("identity: bundle of %s: issuer returned the bundle of %s", m.td, b.TrustDomain())
	}
	var root *x509.Certificate
	if sr, ok := m.issuer.(SigningRooter); ok {
		if root, err = sr.SigningRoot(ctx); err != nil {
			return nil, fmt.Errorf("identity: signing root of %s: %w", m.td, err)
		}
	}
	m.mu.Lock()
	now := m.clock.Now()
	changed := m.bundle == nil || !m.bundle.Equal(b)
	rootChanged := root != nil && (m.signingRoot == nil || !m.signingRoot.Equal(root))
	m.bundle, m.bundleChecked = b, now
	if root != nil {
		m.signingRoot = root
	}
	if changed {
		m.bundleChanged = now
	}
	var renewNow, reissue []string
	if changed || rootChanged {
		renewNow, reissue = m.recheckLocked(now)
	}
	m.mu.Unlock()
	if changed {
		m.log.Info("trust bundle updated", "trust_domain", m.td.Name(), "authorities", len(b.X509Authorities()))
	}
	if rootChanged {
		m.log.Info("the issuer signs under another root", "trust_domain", m.td.Name(), "root", Fingerprint(root))
	}
	if len(renewNow) > 0 {
		m.log.Warn("SVIDs no longer chain to the trust bundle; renewing them now", "spiffe_ids", renewNow)
	}
	if len(reissue) > 0 {
		m.log.Info("renewing SVIDs of a root that no longer signs", "spiffe_ids", reissue, "within", m.opts.ReissueSpread)
	}
	if len(renewNow)+len(reissue) > 0 {
		m.wake()
	}
	return b, nil
}

// recheckLocked looks at every SVID after the bundle or the signing root
// changed: one that no longer verifies against the bundle is renewed now;
// one under a root other than the signing root is renewed at a random
// moment within ReissueSpread (at most once per change of root).
func (m *Manager) recheckLocked(now time.Time) (renewNow, reissue []string) {
	for _, e := range m.entries {
		if e.svid == nil {
			continue
		}
		if _, _, err := x509svid.Verify(e.svid.Certificates, m.bundle, x509svid.WithTime(now)); err != nil {
			if e.renewAt.After(now) {
				e.renewAt = now
			}
			renewNow = append(renewNow, e.id.String())
			continue
		}
		if m.signingRoot == nil || e.root == nil || e.root.Equal(m.signingRoot) || e.reissue {
			continue
		}
		e.reissue = true
		if at := now.Add(time.Duration(mrand.Int64N(int64(m.opts.ReissueSpread) + 1))); at.Before(e.renewAt) {
			e.renewAt = at
		}
		reissue = append(reissue, e.id.String())
	}
	slices.Sort(renewNow)
	slices.Sort(reissue)
	return renewNow, reissue
}

// Fingerprint names a certificate: the SHA-256 of its DER, in hex.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// refreshBundle is Run's periodic bundle fetch, started at start: the next
// one is due a period after that start, not after this fetch ended, so
// that a slow fetch does not stretch the period (nor a clock that moved
// while it ran).
func (m *Manager) refreshBundle(ctx context.Context, start time.Time) {
	ctx, cancel := context.WithTimeout(ctx, m.opts.FetchTimeout)
	defer cancel()
	_, err := m.fetchBundle(ctx)
	m.mu.Lock()
	m.bundleFetching = false
	m.bundleErr = err
	next := m.opts.BundleRefresh
	if err == nil {
		m.bundleFailures = 0
	} else {
		m.bundleFailures++
		next = min(m.backoff(m.bundleFailures), m.opts.BundleRefresh)
	}
	m.bundleNext = start.Add(next)
	m.mu.Unlock()
	m.wake()
	if err != nil && ctx.Err() == nil {
		m.log.Warn("trust bundle refresh failed; keeping the current one", "error", err, "retry_in", next)
	}
}

// CertInfo describes the SVID the Manager holds for one identity.
type CertInfo struct {
	ID spiffeid.ID
	// Serial is the leaf's serial number in hex; empty without an SVID.
	Serial string
	// NotBefore and NotAfter bound the SVID's validity; zero without one.
	NotBefore, NotAfter time.Time
	// IssuedAt is when the SVID arrived; zero without one.
	IssuedAt time.Time
	// RenewAt is when the next renewal (or retry) is due.
	RenewAt time.Time
	// Failures counts consecutive failed attempts; LastError is the last
	// one's message ("" after a success).
	Failures  int
	LastError string
	// Root is the Fingerprint of the root the SVID chains to; empty
	// without one.
	Root string
}

// Certificates describes every identity the Manager keeps, sorted by
// SPIFFE ID.
func (m *Manager) Certificates() []CertInfo {
	m.mu.Lock()
	out := make([]CertInfo, 0, len(m.entries))
	for _, e := range m.entries {
		ci := CertInfo{ID: e.id, RenewAt: e.renewAt, Failures: e.failures, IssuedAt: e.issuedAt}
		if e.svid != nil {
			leaf := e.svid.Certificates[0]
			ci.Serial, ci.NotBefore, ci.NotAfter = serialHex(leaf), leaf.NotBefore, leaf.NotAfter
		}
		if e.root != nil {
			ci.Root = Fingerprint(e.root)
		}
		if e.lastErr != nil {
			ci.LastError = e.lastErr.Error()
		}
		out = append(out, ci)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b CertInfo) int { return cmp.Compare(a.ID.String(), b.ID.String()) })
	return out
}

func serialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// BundleInfo describes a trust bundle the Manager or a Federation holds.
type BundleInfo struct {
	TrustDomain spiffeid.TrustDomain
	// Federated is true for a foreign trust domain's bundle, read from
	// Source (its file).
	Federated bool
	Source    string
	// Reloads counts the changes read from Source after the first.
	Reloads uint64
	// Roots are the bundle's authorities.
	Roots []RootInfo
	// ChangedAt is when the bundle last changed, CheckedAt when it was
	// last fetched; zero before the first fetch.
	ChangedAt, CheckedAt time.Time
	// Failures counts consecutive failed refreshes; LastError is the
	// last one's message ("" after a success).
	Failures  int
	LastError string
}

// RootInfo describes one root certificate of a bundle.
type RootInfo struct {
	Fingerprint string
	Subject     string
	NotAfter    time.Time
	// Signing is true for the root the issuer signs under now (known
	// from a SigningRooter only).
	Signing bool
}

// Bundles describes the trust bundles the Manager holds: its own trust
// domain's first.
func (m *Manager) Bundles() []BundleInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	bi := BundleInfo{TrustDomain: m.td, ChangedAt: m.bundleChanged, CheckedAt: m.bundleChecked, Failures: m.bundleFailures}
	if m.bundleErr != nil {
		bi.LastError = m.bundleErr.Error()
	}
	if m.bundle != nil {
		for _, r := range m.bundle.X509Authorities() {
			bi.Roots = append(bi.Roots, RootInfo{Fingerprint: Fingerprint(r), Subject: r.Subject.String(), NotAfter: r.NotAfter,
				Signing: m.signingRoot != nil && r.Equal(m.signingRoot)})
		}
	}
	return []BundleInfo{bi}
}

func tlsCertificate(s *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, x := range s.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}
