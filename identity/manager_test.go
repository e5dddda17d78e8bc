package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

var _ x509bundle.Source = (*identity.Manager)(nil)

func TestFirstFetchMintsAKeyOnTheNodeAndCachesTheSVID(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	s, err := h.m.SVID(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	if s.ID != idA {
		t.Errorf("SVID ID = %s, want %s", s.ID, idA)
	}
	key, ok := s.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		t.Errorf("private key is %T, want ECDSA P-256", s.PrivateKey)
	}
	if got := s.Certificates[0].NotAfter.Sub(t0); got != identity.DefaultSVIDTTL {
		t.Errorf("lifetime = %v, want the default %v", got, identity.DefaultSVIDTTL)
	}
	if _, _, err := x509svid.Verify(s.Certificates, h.m, x509svid.WithTime(t0)); err != nil {
		t.Fatalf("the SVID does not verify against the Manager's own bundle: %v", err)
	}
	// The issuer saw only a request: the public key, and the identity.
	csr, err := x509.ParseCertificateRequest(h.issuer.csrs[0])
	if err != nil {
		t.Fatal(err)
	}
	if !key.PublicKey.Equal(csr.PublicKey) || len(csr.URIs) != 1 || csr.URIs[0].String() != idA.String() {
		t.Errorf("CSR carries key %v and URIs %v", csr.PublicKey, csr.URIs)
	}
	if ev := h.event(t); ev.id != idA || ev.err != nil {
		t.Errorf("OnIssue(%s, %v), want (%s, nil)", ev.id, ev.err, idA)
	}

	again, err := h.m.SVID(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	if again != s || len(h.issuer.calls()) != 1 {
		t.Errorf("second SVID call: same SVID %v, issuer calls %d; want the cached SVID and 1 call", again == s, len(h.issuer.calls()))
	}
	cert, err := h.m.TLSCertificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Leaf != s.Certificates[0] || cert.PrivateKey != s.PrivateKey || len(cert.Certificate) != len(s.Certificates) {
		t.Error("TLSCertificate does not match the SVID")
	}
}

func TestConcurrentCallersShareOneFetch(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	h.issuer.gate = make(chan struct{})
	h.issuer.started = make(chan struct{}, 100)

	const callers = 50
	var wg sync.WaitGroup
	serials := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			s, err := h.m.SVID(context.Background(), idA)
			errs[i] = err
			if err == nil {
				serials[i] = s.Certificates[0].SerialNumber.String()
			}
		})
	}
	<-h.issuer.started                // the one fetch is in the issuer
	time.Sleep(20 * time.Millisecond) // let the other callers pile up
	close(h.issuer.gate)
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || serials[i] != serials[0] {
			t.Fatalf("caller %d: serial %s err %v; want all callers to get serial %s", i, serials[i], errs[i], serials[0])
		}
	}
	if n := len(h.issuer.calls()); n != 1 {
		t.Fatalf("issuer was asked %d times for %d concurrent callers, want once", n, callers)
	}
}

func TestACallerGivingUpDoesNotSpoilTheFetchForOthers(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	h.issuer.gate = make(chan struct{})
	h.issuer.started = make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := h.m.SVID(ctx, idA); errc <- err }()
	<-h.issuer.started
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller got %v, want context.Canceled", err)
	}
	close(h.issuer.gate)
	h.svid(t, idA)
	if n := len(h.issuer.calls()); n != 1 {
		t.Fatalf("issuer asked %d times, want once (the first fetch went on)", n)
	}
}

func TestPrefetchFetchesAhead(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	h.m.Prefetch(idA)
	h.m.Prefetch(idA) // a second workload with the same identity
	if ev := h.event(t); ev.id != idA || ev.err != nil {
		t.Fatalf("prefetch: OnIssue(%s, %v)", ev.id, ev.err)
	}
	h.svid(t, idA)
	if n := len(h.issuer.calls()); n != 1 {
		t.Fatalf("issuer asked %d times, want once: the prefetched SVID should serve", n)
	}
	h.m.Prefetch(spiffeid.RequireFromString("spiffe://other.td/ns/a/sa/b"))
	if n := len(h.m.Certificates()); n != 1 {
		t.Fatalf("a foreign identity was prefetched: %d identities kept", n)
	}
}

func TestRenewalAtHalfLifeWithJitter(t *testing.T) {
	const ttl = 24 * time.Hour
	h := newHarness(t, identity.ManagerOptions{TTL: ttl}, true)

	// Many identities, to see the jitter spread within its bounds.
	var ids []spiffeid.ID
	for i := range 40 {
		ids = append(ids, spiffeid.RequireFromString(fmt.Sprintf("spiffe://cluster.local/ns/n%d/sa/s", i)))
	}
	for _, id := range ids {
		h.svid(t, id)
		h.event(t)
	}
	earliest, latest := t0.Add(ttl), t0
	var first spiffeid.ID
	for _, ci := range h.m.Certificates() {
		after := ci.RenewAt.Sub(t0)
		if after < 40*ttl/100 || after > 60*ttl/100 {
			t.Errorf("%s renews %v after issuance, want within 50%% ± 10%% of %v", ci.ID, after, ttl)
		}
		if ci.RenewAt.Before(earliest) {
			earliest, first = ci.RenewAt, ci.ID
		}
		if ci.RenewAt.After(latest) {
			latest = ci.RenewAt
		}
	}
	if latest.Sub(earliest) < time.Hour {
		t.Errorf("renewals of 40 identities fall within %v: no jitter", latest.Sub(earliest))
	}
	old := h.svid(t, first)

	h.clock.Set(earliest.Add(-time.Second))
	h.quiet(t)
	if got := h.svid(t, first); got != old {
		t.Fatal("SVID changed before its renewal time")
	}

	h.clock.Set(earliest)
	ev := h.event(t)
	if ev.id != first || ev.err != nil {
		t.Fatalf("renewal: OnIssue(%s, %v), want (%s, nil)", ev.id, ev.err, first)
	}
	renewed := h.svid(t, first)
	if renewed == old {
		t.Fatal("SVID not replaced by the renewal")
	}
	ci := h.info(t, first)
	if valid := ci.NotAfter.Sub(earliest); !ci.IssuedAt.Equal(earliest) || valid > ttl || valid < ttl-time.Second {
		t.Errorf("renewed SVID issued %v, expires %v; want issued %v, valid %v", ci.IssuedAt, ci.NotAfter, earliest, ttl)
	}
	if after := ci.RenewAt.Sub(earliest); after < 40*ttl/100 || after > 60*ttl/100 {
		t.Errorf("next renewal %v after the last, want about half of %v", after, ttl)
	}
	if calls := h.issuer.calls(); !calls[len(calls)-1].Equal(earliest) {
		t.Errorf("renewal asked the issuer at %v, want %v", calls[len(calls)-1], earliest)
	}
}

func TestFailedRenewalsBackOffAndTheOldSVIDServesUntilItExpires(t *testing.T) {
	const ttl = time.Hour
	h := newHarness(t, identity.ManagerOptions{TTL: ttl, Jitter: -1, MinBackoff: time.Second, MaxBackoff: 8 * time.Second}, true)
	old := h.svid(t, idA)
	h.event(t)
	renewAt := h.info(t, idA).RenewAt
	if renewAt.Sub(t0) != ttl/2 {
		t.Fatalf("without jitter the renewal is due %v after issuance, want %v", renewAt.Sub(t0), ttl/2)
	}

	h.issuer.setFail(errIssuerDown)
	h.clock.Set(renewAt)
	var gaps []time.Duration
	for range 6 {
		ev := h.event(t)
		if !errors.Is(ev.err, errIssuerDown) {
			t.Fatalf("attempt at %v: OnIssue err %v, want the issuer's", h.clock.Now(), ev.err)
		}
		ci := h.info(t, idA)
		gaps = append(gaps, ci.RenewAt.Sub(h.clock.Now()))
		if got := h.svid(t, idA); got != old {
			t.Fatalf("while renewals fail, SVID serves %s, want the old %s", got, old)
		}
		h.clock.Set(ci.RenewAt)
	}
	h.event(t) // the 7th attempt, started by the last Set
	want := []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 8 * time.Second, 8 * time.Second}
	if fmt.Sprint(gaps) != fmt.Sprint(want) {
		t.Errorf("retry delays = %v, want %v", gaps, want)
	}
	if ci := h.info(t, idA); ci.Failures != 7 || !strings.Contains(ci.LastError, "issuer is down") {
		t.Errorf("CertInfo failures %d, last error %q", ci.Failures, ci.LastError)
	}

	// The issuer stays down past the SVID's expiry: no SVID any more.
	notAfter := h.info(t, idA).NotAfter
	h.clock.Set(notAfter)
	if ev := h.event(t); ev.err == nil { // the retry due at expiry fails too
		t.Fatal("the issuer is down, yet an attempt succeeded")
	}
	_, err := h.m.SVID(context.Background(), idA)
	if !errors.Is(err, identity.ErrUnavailable) || !errors.Is(err, errIssuerDown) || !strings.Contains(err.Error(), "the last SVID expired at") {
		t.Fatalf("SVID after expiry = %v, want ErrUnavailable saying the last SVID expired, wrapping the issuer's error", err)
	}

	// The issuer comes back: the next retry brings a fresh SVID.
	h.issuer.setFail(nil)
	h.clock.Set(h.info(t, idA).RenewAt)
	if ev := h.event(t); ev.err != nil {
		t.Fatalf("after the issuer came back: %v", ev.err)
	}
	if got := h.svid(t, idA); got == old {
		t.Fatal("still the expired SVID")
	}
	if ci := h.info(t, idA); ci.Failures != 0 || ci.LastError != "" || ci.RenewAt.Sub(h.clock.Now()) != ttl/2 {
		t.Errorf("after recovery: failures %d, last error %q, renewal in %v", ci.Failures, ci.LastError, ci.RenewAt.Sub(h.clock.Now()))
	}
}

func TestFailedFirstFetchIsRetriedWithBackoff(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{MinBackoff: 2 * time.Second}, true)
	h.issuer.setFail(errIssuerDown)
	_, err := h.m.SVID(context.Background(), idA)
	if !errors.Is(err, identity.ErrUnavailable) || !errors.Is(err, errIssuerDown) || !strings.Contains(err.Error(), "no SVID yet") {
		t.Fatalf("SVID with the issuer down = %v", err)
	}
	h.event(t)
	// Within the backoff, callers fail at once; the issuer is not asked.
	if _, err := h.m.SVID(context.Background(), idA); !errors.Is(err, identity.ErrUnavailable) {
		t.Fatalf("second SVID = %v", err)
	}
	if n := len(h.issuer.calls()); n != 1 {
		t.Fatalf("issuer asked %d times within the backoff, want once", n)
	}
	h.issuer.setFail(nil)
	h.clock.Advance(2 * time.Second) // Run retries in the background
	if ev := h.event(t); ev.err != nil {
		t.Fatalf("retry: %v", ev.err)
	}
	h.svid(t, idA)
}

func TestForgetDropsTheIdentity(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, true)
	first := h.svid(t, idA)
	h.svid(t, idB)
	h.m.Forget(idA)
	if got := h.m.Certificates(); len(got) != 1 || got[0].ID != idB {
		t.Fatalf("after Forget(%s), Certificates() = %v", idA, got)
	}
	// Nothing is renewed for a forgotten identity.
	h.event(t)
	h.event(t)
	h.clock.Advance(24 * time.Hour)
	if ev := h.event(t); ev.id != idB {
		t.Fatalf("renewed %s, want only %s", ev.id, idB)
	}
	h.quiet(t)
	// Asked again, it is fetched anew.
	if again := h.svid(t, idA); again == first {
		t.Fatal("a forgotten identity's SVID was served again")
	}
}

func TestForgetDuringAFetchDoesNotBringTheIdentityBack(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	h.issuer.gate = make(chan struct{})
	h.issuer.started = make(chan struct{}, 1)
	h.m.Prefetch(idA)
	<-h.issuer.started
	h.m.Forget(idA)
	close(h.issuer.gate)
	h.event(t)
	if got := h.m.Certificates(); len(got) != 0 {
		t.Fatalf("Certificates() = %v, want none", got)
	}
}

func TestForeignTrustDomainIsRefused(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	other := spiffeid.RequireTrustDomainFromString("other.td")
	if _, err := h.m.SVID(context.Background(), spiffeid.RequireFromSegments(other, "ns", "a", "sa", "b")); !errors.Is(err, identity.ErrUnknownTrustDomain) {
		t.Errorf("SVID of a foreign trust domain = %v, want ErrUnknownTrustDomain", err)
	}
	if _, err := h.m.GetX509BundleForTrustDomain(other); !errors.Is(err, identity.ErrUnknownTrustDomain) {
		t.Errorf("bundle of a foreign trust domain = %v, want ErrUnknownTrustDomain", err)
	}
	if n := len(h.issuer.calls()); n != 0 {
		t.Errorf("issuer asked %d times", n)
	}
}

// handIssuer signs requests by hand, with mistakes a broken or hostile
// issuer could make.
type handIssuer struct {
	root    *x509.Certificate
	key     *ecdsa.PrivateKey
	bundle  *x509bundle.Bundle // Bundle returns it if set, else the root
	swapID  spiffeid.ID        // certify this identity instead of the asked one
	swapKey bool               // certify a key of its own instead of the request's
}

func newHandIssuer(t *testing.T) *handIssuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{td.ID().URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &handIssuer{root: root, key: key}
}

func (h *handIssuer) SignCSR(_ context.Context, csrDER []byte, id spiffeid.ID, _ time.Duration) ([]*x509.Certificate, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	pub := csr.PublicKey
	if h.swapKey {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		pub = &k.PublicKey
	}
	if !h.swapID.IsZero() {
		id = h.swapID
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, URIs: []*url.URL{id.URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, h.root, pub, h.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	return []*x509.Certificate{leaf}, err
}

func (h *handIssuer) Bundle(context.Context) (*x509bundle.Bundle, error) {
	if h.bundle != nil {
		return h.bundle, nil
	}
	return x509bundle.FromX509Authorities(td, []*x509.Certificate{h.root}), nil
}

func TestUnusableCertificatesFromTheIssuerAreRefused(t *testing.T) {
	stranger, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	strangerBundle, _ := stranger.Bundle(context.Background())
	for _, tc := range []struct {
		name    string
		spoil   func(h *handIssuer)
		wantErr string
	}{
		{"a chain that does not verify against the bundle", func(h *handIssuer) { h.bundle = strangerBundle }, "unusable certificate"},
		{"a certificate for another identity", func(h *handIssuer) { h.swapID = idB }, "it names " + idB.String()},
		{"a certificate for another key", func(h *handIssuer) { h.swapKey = true }, "a certificate for another key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			issuer := newHandIssuer(t)
			good := identity.NewManager(issuer, td, discardLogger(), identity.ManagerOptions{})
			if _, err := good.SVID(context.Background(), idA); err != nil {
				t.Fatalf("the unspoilt issuer does not work: %v", err)
			}
			tc.spoil(issuer)
			m := identity.NewManager(issuer, td, discardLogger(), identity.ManagerOptions{})
			_, err := m.SVID(context.Background(), idA)
			if !errors.Is(err, identity.ErrUnavailable) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("SVID = %v, want ErrUnavailable mentioning %q", err, tc.wantErr)
			}
		})
	}
}

func TestBundleIsKeptCurrent(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{BundleRefresh: time.Minute, MinBackoff: time.Second}, true)
	b, err := h.m.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if !b.HasX509Authority(h.issuer.ca.Root()) {
		t.Fatal("bundle lacks the CA's root")
	}
	// The CA adds a second root (a rotation begins).
	next, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h.issuer.mu.Lock()
	h.issuer.bundle = x509bundle.FromX509Authorities(td, []*x509.Certificate{h.issuer.ca.Root(), next.Root()})
	h.issuer.mu.Unlock()

	calls := h.issuer.bundleCalls()
	h.clock.Advance(time.Minute)
	waitFor(t, "a bundle refresh", func() bool { return h.issuer.bundleCalls() > calls })
	waitFor(t, "the new root in the bundle", func() bool {
		b, _ := h.m.GetX509BundleForTrustDomain(td)
		return b.HasX509Authority(next.Root())
	})

	// A failing refresh keeps the bundle.
	h.issuer.setFail(errIssuerDown)
	calls = h.issuer.bundleCalls()
	h.clock.Advance(time.Minute)
	waitFor(t, "a failed bundle refresh", func() bool { return h.issuer.bundleCalls() > calls })
	if b, err := h.m.GetX509BundleForTrustDomain(td); err != nil || !b.HasX509Authority(next.Root()) {
		t.Fatalf("after a failed refresh: bundle %v, err %v; want the last good one", b, err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 10s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRunTwiceIsRefused(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, true)
	waitFor(t, "Run to start", func() bool { return h.issuer.bundleCalls() > 0 })
	if err := h.m.Run(context.Background()); err == nil {
		t.Fatal("a second Run started")
	}
}

// TestSourcesServeGoSpiffeTLS runs a mutual TLS handshake configured with
// go-spiffe's tlsconfig from the Manager's Source and bundle: the way the
// ztunnel uses it.
func TestSourcesServeGoSpiffeTLS(t *testing.T) {
	c, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	m := identity.NewManager(c, td, discardLogger(), identity.ManagerOptions{})
	serverConf := tlsconfig.MTLSServerConfig(m.Source(idB), m, tlsconfig.AuthorizeID(idA))
	clientConf := tlsconfig.MTLSClientConfig(m.Source(idA), m, tlsconfig.AuthorizeID(idB))
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	srv, cli := tls.Server(a, serverConf), tls.Client(b, clientConf)
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	peer, err := x509svid.IDFromCert(srv.ConnectionState().PeerCertificates[0])
	if err != nil || peer != idA {
		t.Fatalf("server saw peer %s (%v), want %s", peer, err, idA)
	}
}

// TestRootRotationRenewsSVIDsUnderTheNewRootWithinTheSpread walks a root
// rotation of the issuer: preparing changes nothing but the bundle;
// activating makes every SVID of the old root renew within ReissueSpread;
// finishing changes nothing more; and a CA replaced outright (no overlap)
// makes every SVID renew at once.
func TestRootRotationRenewsSVIDsUnderTheNewRootWithinTheSpread(t *testing.T) {
	const refresh, spread = 10 * time.Second, time.Minute
	h := newHarness(t, identity.ManagerOptions{BundleRefresh: refresh, ReissueSpread: spread}, true)
	for _, id := range []spiffeid.ID{idA, idB} {
		h.svid(t, id)
		h.event(t)
	}
	oldRoot := identity.Fingerprint(h.issuer.currentCA().Root())
	step := func(f func(*ca.CA) (*ca.CA, error)) *ca.CA {
		t.Helper()
		c, err := f(h.issuer.currentCA())
		if err != nil {
			t.Fatal(err)
		}
		h.issuer.setCA(c)
		calls := h.issuer.bundleCalls()
		h.clock.Advance(refresh)
		waitFor(t, "a bundle refresh", func() bool { return h.issuer.bundleCalls() > calls })
		waitFor(t, "the new bundle", func() bool {
			b := h.m.Bundles()[0]
			return len(b.Roots) == len(c.Roots()) && b.Roots[0].Fingerprint == identity.Fingerprint(c.Roots()[0])
		})
		return c
	}

	step((*ca.CA).Prepare)
	h.quiet(t)
	if b := h.m.Bundles()[0]; len(b.Roots) != 2 || !b.Roots[0].Signing || b.Roots[1].Signing {
		t.Fatalf("prepared: bundle %+v; want two roots, the first signing", b.Roots)
	}

	activated := step((*ca.CA).Activate)
	now := h.clock.Now()
	for _, id := range []spiffeid.ID{idA, idB} {
		ci := h.info(t, id)
		if ci.Root != oldRoot {
			t.Fatalf("%s changed root before its renewal", id)
		}
		waitFor(t, "the renewal brought forward", func() bool { return !h.info(t, id).RenewAt.After(now.Add(spread)) })
		if at := h.info(t, id).RenewAt; at.Before(now) {
			t.Errorf("%s renews at %v, before the change was seen (%v)", id, at, now)
		}
	}
	h.clock.Advance(spread)
	got := map[spiffeid.ID]bool{}
	for range 2 {
		ev := h.event(t)
		if ev.err != nil {
			t.Fatal(ev.err)
		}
		got[ev.id] = true
	}
	newRoot := identity.Fingerprint(activated.Root())
	for _, id := range []spiffeid.ID{idA, idB} {
		if !got[id] || h.info(t, id).Root != newRoot {
			t.Errorf("%s: renewed %v, root %s; want renewed under %s", id, got[id], h.info(t, id).Root, newRoot)
		}
	}

	step((*ca.CA).Finish)
	h.quiet(t)

	// A CA replaced outright: SVIDs stop verifying against the new bundle.
	fresh, err := ca.New(td, ca.Options{Now: h.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	h.issuer.setCA(fresh)
	h.clock.Advance(refresh)
	for range 2 {
		if ev := h.event(t); ev.err != nil {
			t.Fatal(ev.err)
		}
	}
	for _, id := range []spiffeid.ID{idA, idB} {
		if h.info(t, id).Root != identity.Fingerprint(fresh.Root()) {
			t.Errorf("%s not renewed under the replaced CA", id)
		}
	}
}
