package identity_test

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

// fakeClock is a Clock that moves only when told to.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c  *fakeClock
	at time.Time
	ch chan time.Time
}

func newFakeClock(t time.Time) *fakeClock { return &fakeClock{now: t} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) TimerAt(at time.Time) identity.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: at, ch: make(chan time.Time, 1)}
	if !at.After(c.now) {
		t.ch <- c.now
	} else {
		c.timers = append(c.timers, t)
	}
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	for i, x := range t.c.timers {
		if x == t {
			t.c.timers = append(t.c.timers[:i], t.c.timers[i+1:]...)
			return true
		}
	}
	return false
}

// Set moves the clock to now (never backwards) and fires the timers due.
func (c *fakeClock) Set(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Before(c.now) {
		panic("fakeClock: backwards")
	}
	c.now = now
	kept := c.timers[:0]
	for _, t := range c.timers {
		if t.at.After(now) {
			kept = append(kept, t)
			continue
		}
		t.ch <- now
	}
	c.timers = kept
}

func (c *fakeClock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// fakeIssuer is an in-memory CA that can be made to fail or to hang, and
// records when it was asked.
type fakeIssuer struct {
	ca    *ca.CA
	clock *fakeClock

	mu        sync.Mutex
	fail      error         // SignCSR and Bundle fail with it when set
	gate      chan struct{} // SignCSR waits for it to close when set
	signTimes []time.Time
	csrs      [][]byte
	bundle    *x509bundle.Bundle // Bundle returns it when set
	bundles   int
	started   chan struct{} // receives once per SignCSR call, when set
}

var errIssuerDown = errors.New("issuer is down")

func newFakeIssuer(t testing.TB, clock *fakeClock) *fakeIssuer {
	t.Helper()
	c, err := ca.New(td, ca.Options{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return &fakeIssuer{ca: c, clock: clock}
}

func (f *fakeIssuer) SignCSR(ctx context.Context, csr []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	f.mu.Lock()
	f.signTimes = append(f.signTimes, f.clock.Now())
	f.csrs = append(f.csrs, csr)
	gate, fail, started := f.gate, f.fail, f.started
	f.mu.Unlock()
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
	if fail != nil {
		return nil, fail
	}
	return f.currentCA().SignCSR(ctx, csr, id, ttl)
}

func (f *fakeIssuer) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bundles++
	if f.fail != nil {
		return nil, f.fail
	}
	if f.bundle != nil {
		return f.bundle, nil
	}
	return f.ca.Bundle(ctx)
}

// SigningRoot makes the fake a SigningRooter: the root of its CA.
func (f *fakeIssuer) SigningRoot(context.Context) (*x509.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	return f.ca.Root(), nil
}

// setCA replaces the CA (a rotation step, or a new CA).
func (f *fakeIssuer) setCA(c *ca.CA) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ca = c
}

func (f *fakeIssuer) currentCA() *ca.CA {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ca
}

func (f *fakeIssuer) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

func (f *fakeIssuer) calls() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.signTimes...)
}

func (f *fakeIssuer) bundleCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bundles
}

// issueEvent is one OnIssue callback.
type issueEvent struct {
	id  spiffeid.ID
	err error
}

type harness struct {
	clock  *fakeClock
	issuer *fakeIssuer
	m      *identity.Manager
	events chan issueEvent
}

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	t0  = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	idA = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	idB = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/pay")
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newHarness makes a Manager over a fake issuer and a fake clock. run
// starts its Run loop, stopped when the test ends.
func newHarness(t testing.TB, opts identity.ManagerOptions, run bool) *harness {
	t.Helper()
	h := &harness{clock: newFakeClock(t0), events: make(chan issueEvent, 100)}
	h.issuer = newFakeIssuer(t, h.clock)
	opts.Clock = h.clock
	opts.OnIssue = func(id spiffeid.ID, err error) { h.events <- issueEvent{id, err} }
	h.m = identity.NewManager(h.issuer, td, discardLogger(), opts)
	if run {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.m.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run = %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("Run did not return after its context was cancelled")
			}
		})
	}
	return h
}

// event waits for the next OnIssue callback.
func (h *harness) event(t *testing.T) issueEvent {
	t.Helper()
	select {
	case ev := <-h.events:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no issuance attempt within 10s")
		return issueEvent{}
	}
}

// quiet checks that no issuance attempt happens for a short while.
func (h *harness) quiet(t *testing.T) {
	t.Helper()
	select {
	case ev := <-h.events:
		t.Fatalf("unexpected issuance attempt for %s at %v (err %v)", ev.id, h.clock.Now(), ev.err)
	case <-time.After(50 * time.Millisecond):
	}
}

func (h *harness) svid(t *testing.T, id spiffeid.ID) string {
	t.Helper()
	s, err := h.m.SVID(context.Background(), id)
	if err != nil {
		t.Fatalf("SVID(%s) at %v: %v", id, h.clock.Now(), err)
	}
	return s.Certificates[0].SerialNumber.Text(16)
}

func (h *harness) info(t *testing.T, id spiffeid.ID) identity.CertInfo {
	t.Helper()
	for _, ci := range h.m.Certificates() {
		if ci.ID == id {
			return ci
		}
	}
	t.Fatalf("Certificates() has no %s", id)
	return identity.CertInfo{}
}
