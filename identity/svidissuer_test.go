package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

// wholeIssuer is an SVIDIssuer in the manner of SPIRE: it makes the keys,
// keeps one SVID per identity and replaces it when told to (Rotate),
// telling the Manager.
type wholeIssuer struct {
	ca    *ca.CA
	clock *fakeClock
	ttl   time.Duration

	mu       sync.Mutex
	svids    map[spiffeid.ID]*x509svid.SVID
	fetches  map[spiffeid.ID]int
	released []spiffeid.ID
	bundles  int
	notify   func(spiffeid.ID)
	tamper   func(*x509svid.SVID) *x509svid.SVID // changes what FetchSVID returns, when set
	gate     chan struct{}                       // FetchSVID waits for it to close, when set
	started  chan struct{}                       // receives once per FetchSVID call, when set
}

func newWholeIssuer(t testing.TB, clock *fakeClock) *wholeIssuer {
	t.Helper()
	c, err := ca.New(td, ca.Options{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return &wholeIssuer{ca: c, clock: clock, ttl: time.Hour, svids: map[spiffeid.ID]*x509svid.SVID{}, fetches: map[spiffeid.ID]int{}}
}

func (w *wholeIssuer) mint(id spiffeid.ID) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	chain, err := w.ca.SignCSR(context.Background(), csr, id, w.ttl)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

func (w *wholeIssuer) FetchSVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	w.mu.Lock()
	w.fetches[id]++
	gate, started := w.gate, w.started
	s := w.svids[id]
	if s == nil {
		var err error
		if s, err = w.mint(id); err != nil {
			w.mu.Unlock()
			return nil, err
		}
		w.svids[id] = s
	}
	if w.tamper != nil {
		s = w.tamper(s)
	}
	w.mu.Unlock()
	if started != nil {
		started <- struct{}{}
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s, nil
}

// Rotate replaces id's SVID and tells the Manager.
func (w *wholeIssuer) Rotate(t testing.TB, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	s, err := w.mint(id)
	if err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	w.svids[id] = s
	notify := w.notify
	w.mu.Unlock()
	notify(id)
	return s
}

func (w *wholeIssuer) fetchCount(id spiffeid.ID) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fetches[id]
}

func (w *wholeIssuer) SignCSR(context.Context, []byte, spiffeid.ID, time.Duration) ([]*x509.Certificate, error) {
	return nil, errors.ErrUnsupported
}

func (w *wholeIssuer) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	w.mu.Lock()
	w.bundles++
	w.mu.Unlock()
	return w.ca.Bundle(ctx)
}

func (w *wholeIssuer) bundleCalls() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.bundles
}

func (w *wholeIssuer) Notify(f func(spiffeid.ID)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.notify = f
}

func (w *wholeIssuer) Release(id spiffeid.ID) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.released = append(w.released, id)
}

var _ identity.SVIDIssuer = (*wholeIssuer)(nil)

// newWholeHarness is newHarness over a wholeIssuer.
func newWholeHarness(t *testing.T, run bool) (*harness, *wholeIssuer) {
	t.Helper()
	h := &harness{clock: newFakeClock(t0), events: make(chan issueEvent, 100)}
	w := newWholeIssuer(t, h.clock)
	opts := identity.ManagerOptions{Clock: h.clock, OnIssue: func(id spiffeid.ID, err error) { h.events <- issueEvent{id, err} }}
	h.m = identity.NewManager(w, td, discardLogger(), opts)
	if run {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.m.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			<-done
		})
	}
	return h, w
}

func TestAnSVIDIssuerHandsOutTheKeyAndTheManagerServesIt(t *testing.T) {
	h, w := newWholeHarness(t, false)
	s, err := h.m.SVID(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	if s.ID != idA || !s.Certificates[0].Equal(w.svids[idA].Certificates[0]) || s.PrivateKey != w.svids[idA].PrivateKey {
		t.Errorf("the Manager serves %s serial %s, want the issuer's own SVID and key", s.ID, s.Certificates[0].SerialNumber.Text(16))
	}
	if ev := h.event(t); ev.id != idA || ev.err != nil {
		t.Errorf("OnIssue(%s, %v), want (%s, nil)", ev.id, ev.err, idA)
	}
}

func TestUnusableSVIDsFromAnSVIDIssuerAreRefused(t *testing.T) {
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := ca.New(td, ca.Options{Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		tamper func(s *x509svid.SVID) *x509svid.SVID
		want   string
	}{
		{"a key that is not the certificate's", func(s *x509svid.SVID) *x509svid.SVID {
			return &x509svid.SVID{ID: s.ID, Certificates: s.Certificates, PrivateKey: otherKey}
		}, "issuer returned a key that does not match the certificate"},
		{"no key", func(s *x509svid.SVID) *x509svid.SVID {
			return &x509svid.SVID{ID: s.ID, Certificates: s.Certificates}
		}, "issuer returned no certificate or no key"},
		{"another identity", func(s *x509svid.SVID) *x509svid.SVID {
			return mustWhole(t, foreign, idB, otherKey, time.Hour)
		}, "issuer returned an unusable certificate"},
		{"a chain to another CA", func(s *x509svid.SVID) *x509svid.SVID {
			return mustWhole(t, foreign, idA, otherKey, time.Hour)
		}, "issuer returned an unusable certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, w := newWholeHarness(t, false)
			w.tamper = tc.tamper
			_, err := h.m.SVID(context.Background(), idA)
			if !errors.Is(err, identity.ErrUnavailable) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("SVID = %v, want ErrUnavailable saying %q", err, tc.want)
			}
		})
	}
}

// mustWhole signs id's certificate for key with c.
func mustWhole(t *testing.T, c *ca.CA, id spiffeid.ID, key *ecdsa.PrivateKey, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.SignCSR(context.Background(), csr, id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

func TestARotationTheIssuerReportsIsFetchedAtOnce(t *testing.T) {
	h, w := newWholeHarness(t, true)
	first := h.svid(t, idA)
	h.event(t)
	// Nothing moves the clock: only the issuer's report can bring the
	// new SVID.
	next := w.Rotate(t, idA)
	if ev := h.event(t); ev.id != idA || ev.err != nil {
		t.Fatalf("OnIssue(%s, %v) after the rotation, want (%s, nil)", ev.id, ev.err, idA)
	}
	got := h.svid(t, idA)
	if want := next.Certificates[0].SerialNumber.Text(16); got != want || got == first {
		t.Errorf("serial after the rotation = %s, want the issuer's new %s (was %s)", got, want, first)
	}
}

func TestAnUnchangedAnswerAtHalfLifeIsNoRenewal(t *testing.T) {
	h, w := newWholeHarness(t, true)
	first := h.svid(t, idA)
	h.event(t)
	// Past the Manager's own renewal time (at most 60% of the hour): the
	// issuer answers with the same SVID, which is neither an issuance
	// nor a failure; the Manager asks again later.
	h.clock.Advance(40 * time.Minute)
	waitFor(t, "a second fetch", func() bool { return w.fetchCount(idA) == 2 })
	h.quiet(t)
	if ci := h.info(t, idA); ci.Failures != 0 || ci.LastError != "" || !ci.RenewAt.After(h.clock.Now()) {
		t.Errorf("after an unchanged answer: %+v, want no failure and a later renewal", ci)
	}
	h.clock.Advance(15 * time.Minute)
	waitFor(t, "a third fetch", func() bool { return w.fetchCount(idA) == 3 })
	h.quiet(t)
	if got := h.svid(t, idA); got != first {
		t.Errorf("serial = %s, want the unchanged %s", got, first)
	}
}

func TestARotationDuringAFetchIsFetchedAfterIt(t *testing.T) {
	h, w := newWholeHarness(t, true)
	h.svid(t, idA)
	h.event(t)
	// A renewal is under way and has read the old SVID when the issuer
	// reports a new one: the Manager fetches once more when it ends.
	gate, started := make(chan struct{}), make(chan struct{}, 1)
	w.mu.Lock()
	w.gate, w.started = gate, started
	w.mu.Unlock()
	h.clock.Advance(40 * time.Minute)
	<-started
	next := w.Rotate(t, idA)
	w.mu.Lock()
	w.gate, w.started = nil, nil
	w.mu.Unlock()
	close(gate)
	if ev := h.event(t); ev.err != nil {
		t.Fatal(ev.err)
	}
	if got, want := h.svid(t, idA), next.Certificates[0].SerialNumber.Text(16); got != want {
		t.Errorf("serial = %s, want the one reported during the fetch, %s", got, want)
	}
}

func TestForgetReleasesTheIdentityAtTheIssuer(t *testing.T) {
	h, w := newWholeHarness(t, false)
	h.svid(t, idA)
	h.m.Forget(idA)
	if len(w.released) != 1 || w.released[0] != idA {
		t.Errorf("released %v, want [%s]", w.released, idA)
	}
}

func TestABundleChangeTheIssuerReportsIsFetchedAtOnce(t *testing.T) {
	h, w := newWholeHarness(t, true)
	if _, err := h.m.Bundle(context.Background()); err != nil {
		t.Fatal(err)
	}
	n := w.bundleCalls()
	w.notify(spiffeid.ID{})
	waitFor(t, "a bundle fetch", func() bool { return w.bundleCalls() > n })
}
