package spire_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/spire"
)

var (
	td   = spiffeid.RequireTrustDomainFromString("cluster.local")
	cart = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	pay  = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/pay")
)

// fakeAgent is the Delegated Identity API of a SPIRE agent, in process:
// entries with selectors and a current SVID each, matched the way SPIRE
// matches them (all of an entry's selectors among the subscriber's).
type fakeAgent struct {
	delegatedv1.UnimplementedDelegatedIdentityServer
	ca *ca.CA

	mu       sync.Mutex
	entries  []*fakeEntry
	deny     error         // every subscription fails with it, when set
	changed  chan struct{} // closed and replaced when entries or the bundle change
	requests [][]string    // selectors of every SVID subscription, in order
	open     int           // SVID subscriptions open now
	bundles  map[string][]*x509.Certificate
	kick     chan struct{} // closing it ends every open subscription
}

type fakeEntry struct {
	selectors []string
	svid      *x509svid.SVID
}

func newFakeAgent(t *testing.T) (*fakeAgent, string) {
	t.Helper()
	c, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeAgent{ca: c, changed: make(chan struct{}), kick: make(chan struct{}),
		bundles: map[string][]*x509.Certificate{"spiffe://cluster.local": {c.Root()}}}
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	delegatedv1.RegisterDelegatedIdentityServer(s, f)
	go func() { _ = s.Serve(ln) }()
	t.Cleanup(s.Stop)
	return f, sock
}

// register adds an entry for id with selectors and mints its first SVID.
func (f *fakeAgent) register(t *testing.T, id spiffeid.ID, selectors ...string) *x509svid.SVID {
	t.Helper()
	e := &fakeEntry{selectors: selectors, svid: f.mint(t, id)}
	f.mu.Lock()
	f.entries = append(f.entries, e)
	f.bumpLocked()
	f.mu.Unlock()
	return e.svid
}

// rotate gives id's entry a new SVID.
func (f *fakeAgent) rotate(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	s := f.mint(t, id)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range f.entries {
		if e.svid.ID == id {
			e.svid = s
		}
	}
	f.bumpLocked()
	return s
}

func (f *fakeAgent) mint(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := f.ca.SignCSR(context.Background(), csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

func (f *fakeAgent) bumpLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// breakStreams ends every open subscription, as a restarting SPIRE agent
// would.
func (f *fakeAgent) breakStreams() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.kick)
	f.kick = make(chan struct{})
}

func (f *fakeAgent) SubscribeToX509SVIDs(req *delegatedv1.SubscribeToX509SVIDsRequest, stream delegatedv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	var sels []string
	for _, s := range req.GetSelectors() {
		sels = append(sels, s.GetType()+":"+s.GetValue())
	}
	f.mu.Lock()
	f.requests = append(f.requests, sels)
	f.open++
	deny := f.deny
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.open--
		f.mu.Unlock()
	}()
	if deny != nil {
		return deny
	}
	for {
		f.mu.Lock()
		resp := &delegatedv1.SubscribeToX509SVIDsResponse{}
		for _, e := range f.entries {
			if !subset(e.selectors, sels) {
				continue
			}
			_, key, err := e.svid.MarshalRaw()
			if err != nil {
				f.mu.Unlock()
				return err
			}
			var chain [][]byte
			for _, c := range e.svid.Certificates {
				chain = append(chain, c.Raw)
			}
			resp.X509Svids = append(resp.X509Svids, &delegatedv1.X509SVIDWithKey{
				X509Svid:    &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: e.svid.ID.TrustDomain().Name(), Path: e.svid.ID.Path()}, CertChain: chain},
				X509SvidKey: key,
			})
		}
		changed, kick := f.changed, f.kick
		f.mu.Unlock()
		if err := stream.Send(resp); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-kick:
			return status.Error(codes.Unavailable, "agent restarting")
		case <-stream.Context().Done():
			return nil
		}
	}
}

func (f *fakeAgent) SubscribeToX509Bundles(_ *delegatedv1.SubscribeToX509BundlesRequest, stream delegatedv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	f.mu.Lock()
	deny := f.deny
	f.mu.Unlock()
	if deny != nil {
		return deny
	}
	for {
		f.mu.Lock()
		resp := &delegatedv1.SubscribeToX509BundlesResponse{CaCertificates: map[string][]byte{}}
		for td, certs := range f.bundles {
			var der []byte
			for _, c := range certs {
				der = append(der, c.Raw...)
			}
			resp.CaCertificates[td] = der
		}
		changed := f.changed
		f.mu.Unlock()
		if err := stream.Send(resp); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func subset(a, b []string) bool {
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

func newIssuer(t *testing.T, sock string, opts spire.Options) *spire.Issuer {
	t.Helper()
	if opts.MinBackoff == 0 {
		opts.MinBackoff = 10 * time.Millisecond
	}
	opts.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	i, err := spire.New(sock, td, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = i.Close() })
	return i
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestFetchSVIDSubscribesWithTheKubernetesSelectorsOfTheIdentity(t *testing.T) {
	agent, sock := newFakeAgent(t)
	want := agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	agent.register(t, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/other"), "k8s:ns:shop", "k8s:sa:other")
	i := newIssuer(t, sock, spire.Options{})
	got, err := i.FetchSVID(ctx(t), cart)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != cart || !got.Certificates[0].Equal(want.Certificates[0]) {
		t.Errorf("FetchSVID = %s serial %s, want the agent's SVID of %s", got.ID, got.Certificates[0].SerialNumber.Text(16), cart)
	}
	agent.mu.Lock()
	reqs := agent.requests
	agent.mu.Unlock()
	if len(reqs) != 1 || !slices.Equal(reqs[0], []string{"k8s:ns:shop", "k8s:sa:cart"}) {
		t.Errorf("subscriptions %q, want one with k8s:ns:shop, k8s:sa:cart", reqs)
	}
	// The subscription stays open: a second fetch asks nothing.
	if _, err := i.FetchSVID(ctx(t), cart); err != nil {
		t.Fatal(err)
	}
	if agent.mu.Lock(); len(agent.requests) != 1 {
		t.Errorf("%d subscriptions after a second fetch, want 1", len(agent.requests))
	}
	agent.mu.Unlock()
}

func TestAnIdentityWithoutAnEntryIsNotRegistered(t *testing.T) {
	agent, sock := newFakeAgent(t)
	agent.register(t, spiffeid.RequireFromString("spiffe://cluster.local/shop-wide"), "k8s:ns:shop")
	i := newIssuer(t, sock, spire.Options{})
	_, err := i.FetchSVID(ctx(t), cart)
	want := "spire: SVID of spiffe://cluster.local/ns/shop/sa/cart: SPIRE has no SVID of this identity for this node " +
		"(the SPIRE agent's entries for selectors k8s:ns:shop, k8s:sa:cart give spiffe://cluster.local/shop-wide): " +
		"register it with these selectors and this node's SPIRE agent as parent"
	if !errors.Is(err, spire.ErrNotRegistered) || err.Error() != want {
		t.Errorf("FetchSVID error:\n%v\nwant\n%s", err, want)
	}
	// Registered later: the next fetch finds it, and the Manager is told.
	notified := make(chan spiffeid.ID, 10)
	i.Notify(func(id spiffeid.ID) { notified <- id })
	agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	if id := waitNotify(t, notified); id != cart {
		t.Errorf("notified %s, want %s", id, cart)
	}
	if _, err := i.FetchSVID(ctx(t), cart); err != nil {
		t.Errorf("FetchSVID after registration: %v", err)
	}
}

func TestARotationIsReportedAndServed(t *testing.T) {
	agent, sock := newFakeAgent(t)
	agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	i := newIssuer(t, sock, spire.Options{})
	notified := make(chan spiffeid.ID, 10)
	i.Notify(func(id spiffeid.ID) { notified <- id })
	if _, err := i.FetchSVID(ctx(t), cart); err != nil {
		t.Fatal(err)
	}
	// The first SVID is reported too, after FetchSVID may have returned.
	waitNotifyOf(t, notified, cart)
	next := agent.rotate(t, cart)
	waitNotifyOf(t, notified, cart)
	got, err := i.FetchSVID(ctx(t), cart)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Certificates[0].Equal(next.Certificates[0]) {
		t.Error("FetchSVID after the rotation does not return the new SVID")
	}
}

func TestABrokenSubscriptionIsOpenedAgainAndTheLastSVIDServesMeanwhile(t *testing.T) {
	agent, sock := newFakeAgent(t)
	first := agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	i := newIssuer(t, sock, spire.Options{MinBackoff: 200 * time.Millisecond})
	if _, err := i.FetchSVID(ctx(t), cart); err != nil {
		t.Fatal(err)
	}
	agent.breakStreams()
	got, err := i.FetchSVID(ctx(t), cart)
	if err != nil || !got.Certificates[0].Equal(first.Certificates[0]) {
		t.Fatalf("FetchSVID while the subscription is down = %v, %v; want the last SVID", got, err)
	}
	waitFor(t, "a second subscription", func() bool {
		agent.mu.Lock()
		defer agent.mu.Unlock()
		return len(agent.requests) == 2 && agent.open == 1
	})
}

func TestRefusalsSayWhatToFix(t *testing.T) {
	delegate := spiffeid.RequireFromString("spiffe://cluster.local/mantlet/agent")
	for _, tc := range []struct {
		name string
		deny error
		want string
	}{
		{"not a delegate", status.Error(codes.PermissionDenied, "caller not configured as an authorized delegate"),
			"spire: the SPIRE agent at SOCK refuses mantlet as a delegate (caller not configured as an authorized delegate): list spiffe://cluster.local/mantlet/agent in its authorized_delegates"},
		{"no socket", nil, "spire: no SPIRE agent answers on the admin socket SOCK (is it running, with admin_socket_path set to it?)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent, sock := newFakeAgent(t)
			agent.deny = tc.deny
			if tc.deny == nil {
				sock += ".missing"
			}
			i := newIssuer(t, sock, spire.Options{Delegate: delegate, MinBackoff: time.Hour})
			_, err := i.FetchSVID(ctx(t), cart)
			want := strings.ReplaceAll(tc.want, "SOCK", sock)
			if err == nil || !strings.HasPrefix(err.Error(), want) {
				t.Errorf("FetchSVID error:\n%v\nwant it to start with\n%s", err, want)
			}
			if _, err := i.Bundle(ctx(t)); err == nil || !strings.HasPrefix(err.Error(), want) {
				t.Errorf("Bundle error:\n%v\nwant it to start with\n%s", err, want)
			}
		})
	}
}

func TestReleaseEndsTheSubscription(t *testing.T) {
	agent, sock := newFakeAgent(t)
	agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	i := newIssuer(t, sock, spire.Options{})
	if _, err := i.FetchSVID(ctx(t), cart); err != nil {
		t.Fatal(err)
	}
	i.Release(cart)
	waitFor(t, "the subscription to end", func() bool {
		agent.mu.Lock()
		defer agent.mu.Unlock()
		return agent.open == 0
	})
}

func TestTheBundleIsTheTrustDomainsAndChangesAreReported(t *testing.T) {
	agent, sock := newFakeAgent(t)
	i := newIssuer(t, sock, spire.Options{})
	notified := make(chan spiffeid.ID, 10)
	i.Notify(func(id spiffeid.ID) { notified <- id })
	b, err := i.Bundle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if !b.HasX509Authority(agent.ca.Root()) || len(b.X509Authorities()) != 1 {
		t.Errorf("bundle has %d authorities, want the agent's one root", len(b.X509Authorities()))
	}
	// The first bundle is reported too, after Bundle may have returned.
	waitNotifyOf(t, notified, spiffeid.ID{})
	next, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	agent.mu.Lock()
	agent.bundles["spiffe://cluster.local"] = []*x509.Certificate{agent.ca.Root(), next.Root()}
	agent.bundles["spiffe://partner.example"] = []*x509.Certificate{next.Root()}
	agent.bumpLocked()
	agent.mu.Unlock()
	if id := waitNotify(t, notified); !id.IsZero() {
		t.Fatalf("notified %s, want the zero ID (the bundle)", id)
	}
	b, err = i.Bundle(ctx(t))
	if err != nil || len(b.X509Authorities()) != 2 || b.TrustDomain() != td {
		t.Errorf("bundle after the change: %v, %v; want two roots of %s", b, err, td)
	}
}

func TestABundleOfAnotherTrustDomainOnlyIsAnError(t *testing.T) {
	agent, sock := newFakeAgent(t)
	agent.bundles = map[string][]*x509.Certificate{"spiffe://example.org": {agent.ca.Root()}}
	i := newIssuer(t, sock, spire.Options{})
	_, err := i.Bundle(ctx(t))
	want := "spire: bundle of cluster.local: SPIRE has no trust bundle of this trust domain (it has spiffe://example.org): is --trust-domain the SPIRE server's?"
	if !errors.Is(err, spire.ErrNoBundle) || err.Error() != want {
		t.Errorf("Bundle error:\n%v\nwant\n%s", err, want)
	}
}

func TestTheManagerRunsOnSPIRE(t *testing.T) {
	agent, sock := newFakeAgent(t)
	agent.register(t, cart, "k8s:ns:shop", "k8s:sa:cart")
	agent.register(t, pay, "k8s:ns:shop", "k8s:sa:pay")
	i := newIssuer(t, sock, spire.Options{})
	issued := make(chan spiffeid.ID, 10)
	m := identity.NewManager(i, td, slog.New(slog.DiscardHandler), identity.ManagerOptions{OnIssue: func(id spiffeid.ID, err error) {
		if err == nil {
			issued <- id
		}
	}})
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = m.Run(runCtx); close(done) }()
	t.Cleanup(func() { stop(); <-done })

	first, err := m.SVID(ctx(t), cart)
	if err != nil {
		t.Fatal(err)
	}
	waitNotify(t, issued)
	next := agent.rotate(t, cart)
	// The Manager fetches at once when SPIRE rotates, not at half-life.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := m.SVID(ctx(t), cart)
		if err != nil {
			t.Fatal(err)
		}
		if s.Certificates[0].Equal(next.Certificates[0]) {
			break
		}
		if !s.Certificates[0].Equal(first.Certificates[0]) || time.Now().After(deadline) {
			t.Fatal("the Manager did not take SPIRE's rotated SVID")
		}
		time.Sleep(5 * time.Millisecond)
	}
	m.Forget(pay) // never fetched: nothing to release, nothing breaks
	m.Forget(cart)
	waitFor(t, "the subscription of a forgotten identity to end", func() bool {
		agent.mu.Lock()
		defer agent.mu.Unlock()
		return agent.open == 0
	})
}

func TestK8sSelectors(t *testing.T) {
	got, err := spire.K8sSelectors(cart)
	if err != nil || len(got) != 2 || got[0].String() != "k8s:ns:shop" || got[1].String() != "k8s:sa:cart" {
		t.Errorf("K8sSelectors(%s) = %v, %v", cart, got, err)
	}
	if _, err := spire.K8sSelectors(spiffeid.RequireFromString("spiffe://cluster.local/vm/db")); !errors.Is(err, identity.ErrNotWorkloadID) {
		t.Errorf("K8sSelectors of a non-workload ID: %v, want ErrNotWorkloadID", err)
	}
}

func waitNotify(t *testing.T, ch <-chan spiffeid.ID) spiffeid.ID {
	t.Helper()
	select {
	case id := <-ch:
		return id
	case <-time.After(10 * time.Second):
		t.Fatal("no notification within 10 s")
		return spiffeid.ID{}
	}
}

// waitNotifyOf waits for a notification of want, passing over others
// (the bundle's, reported as the zero ID, or another identity's).
func waitNotifyOf(t *testing.T, ch <-chan spiffeid.ID, want spiffeid.ID) {
	t.Helper()
	for {
		if waitNotify(t, ch) == want {
			return
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 10 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
