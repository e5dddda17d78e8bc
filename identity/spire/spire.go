// Package spire gets the SVIDs of a node's workloads from the node's SPIRE
// agent, so that SPIRE, not mantlet's own CA, is the mesh's certificate
// authority. Issuer speaks the Delegated Identity API on the SPIRE agent's
// admin socket: one subscription per workload identity, by the selectors
// that describe its workloads (k8s:ns and k8s:sa by default), and one to
// the trust bundles; it implements identity.SVIDIssuer, so the SVID
// manager and everything above it work as with the built-in CA. FetchOwnSVID
// asks the Workload API for the mantlet agent's own identity, which the
// SPIRE agent must list among its authorized delegates.
package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/mantlet/mantlet/identity"
)

// Selector is a SPIRE selector: what a workload attestor says about a
// workload, such as type "k8s", value "ns:shop". SPIRE writes it
// "k8s:ns:shop".
type Selector struct {
	Type, Value string
}

func (s Selector) String() string { return s.Type + ":" + s.Value }

// K8sSelectors returns the selectors of the workloads of a workload
// identity spiffe://<td>/ns/<ns>/sa/<sa>: k8s:ns:<ns> and k8s:sa:<sa>, as
// SPIRE's Kubernetes workload attestor reports them for a pod. A SPIRE
// registration entry matches when all its selectors are among these.
func K8sSelectors(id spiffeid.ID) ([]Selector, error) {
	ns, sa, err := identity.ParseWorkloadID(id)
	if err != nil {
		return nil, err
	}
	return []Selector{{"k8s", "ns:" + ns}, {"k8s", "sa:" + sa}}, nil
}

// Defaults of Options.
const (
	DefaultMinBackoff = time.Second
	DefaultMaxBackoff = 30 * time.Second
)

// Options tune an Issuer. Zero values select the defaults.
type Options struct {
	// Selectors gives the selectors that describe the workloads of an
	// identity (default K8sSelectors).
	Selectors func(spiffeid.ID) ([]Selector, error)
	// Delegate is the mantlet agent's own SPIFFE ID (FetchOwnSVID), named
	// in the error when the SPIRE agent refuses it as a delegate.
	Delegate spiffeid.ID
	// MinBackoff and MaxBackoff bound the wait before a broken
	// subscription is opened again, and between attempts to connect to
	// the admin socket (defaults 1s and 30s, doubling).
	MinBackoff, MaxBackoff time.Duration
	// Logger receives the Issuer's logs (default: discard).
	Logger *slog.Logger
}

// Errors of an Issuer.
var (
	// ErrNotRegistered: the SPIRE agent answered the subscription of an
	// identity, but with no SVID of that identity: no registration entry
	// with this SPIFFE ID, this node's SPIRE agent as parent and the
	// identity's selectors (or a subset) exists.
	ErrNotRegistered = errors.New("SPIRE has no SVID of this identity for this node")
	// ErrNoBundle: the SPIRE agent has no bundle of the trust domain.
	ErrNoBundle = errors.New("SPIRE has no trust bundle of this trust domain")
	// ErrClosed: the Issuer was closed.
	ErrClosed = errors.New("spire: issuer closed")
)

// Issuer gets workload SVIDs and the trust bundle from a SPIRE agent's
// Delegated Identity API. An identity is subscribed to on its first
// FetchSVID and until Release; the subscription stays open, so a new SVID
// from SPIRE (a rotation) is reported to the Manager (identity.SVIDIssuer)
// the moment it arrives. Broken subscriptions are opened again with
// backoff; meanwhile the last SVID received stays available until it
// expires.
type Issuer struct {
	socket string
	td     spiffeid.TrustDomain
	opts   Options
	log    *slog.Logger
	conn   *grpc.ClientConn
	client delegatedv1.DelegatedIdentityClient

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	notify  func(spiffeid.ID)
	subs    map[spiffeid.ID]*subscription
	bundles *watch[*x509bundle.Bundle]
	closed  bool
}

var _ identity.SVIDIssuer = (*Issuer)(nil)

// watch is the state of one subscription: the last value it delivered,
// whether it delivered anything, and its last error. Guarded by Issuer.mu.
type watch[T any] struct {
	cancel   context.CancelFunc
	value    T
	answered bool          // a response arrived since the subscription opened
	err      error         // why the subscription is down, or why its last answer was unusable
	changed  chan struct{} // closed and replaced whenever the fields change
}

func newWatch[T any](cancel context.CancelFunc) *watch[T] {
	return &watch[T]{cancel: cancel, changed: make(chan struct{})}
}

// bump wakes those who wait for a change. Called with Issuer.mu held.
func (w *watch[T]) bump() {
	close(w.changed)
	w.changed = make(chan struct{})
}

// subscription is one identity's SVID subscription.
type subscription struct {
	*watch[*x509svid.SVID]
	selectors []Selector
	missing   bool     // the last answer lacked the identity
	got       []string // the SPIFFE IDs that answer had instead
}

// New returns an Issuer for the identities of trust domain td, served by
// the SPIRE agent whose admin socket is at socket. It does not connect:
// the first FetchSVID or Bundle does. Close releases it.
func New(socket string, td spiffeid.TrustDomain, opts Options) (*Issuer, error) {
	if opts.Selectors == nil {
		opts.Selectors = K8sSelectors
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	opts.MaxBackoff = max(opts.MaxBackoff, opts.MinBackoff)
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The connection's own reconnect backoff follows the subscriptions'
	// (gRPC's default grows to 2 minutes, and a SPIRE agent that came back
	// would go unnoticed that long).
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: opts.MinBackoff, Multiplier: 2, Jitter: 0.2, MaxDelay: opts.MaxBackoff},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("spire: admin socket %s: %w", socket, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Issuer{
		socket: socket, td: td, opts: opts, log: log, conn: conn,
		client: delegatedv1.NewDelegatedIdentityClient(conn),
		ctx:    ctx, cancel: cancel,
		subs: map[spiffeid.ID]*subscription{},
	}, nil
}

// Close ends every subscription and the connection.
func (i *Issuer) Close() error {
	i.mu.Lock()
	i.closed = true
	i.mu.Unlock()
	i.cancel()
	i.wg.Wait()
	return i.conn.Close()
}

// Notify implements identity.SVIDIssuer.
func (i *Issuer) Notify(f func(spiffeid.ID)) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.notify = f
}

// SignCSR implements identity.Issuer, but SPIRE's Delegated Identity API
// signs no requests: the SPIRE agent makes the keys. It always fails with
// an error wrapping errors.ErrUnsupported; the Manager calls FetchSVID.
func (i *Issuer) SignCSR(context.Context, []byte, spiffeid.ID, time.Duration) ([]*x509.Certificate, error) {
	return nil, fmt.Errorf("spire: the SPIRE agent makes the keys of its SVIDs and signs no requests: %w", errors.ErrUnsupported)
}

// FetchSVID returns the SVID of id that the SPIRE agent delivered last,
// subscribing to id first if needed. If it has none (yet), the error
// wraps ErrNotRegistered when SPIRE answered without it, or says why the
// subscription is down.
func (i *Issuer) FetchSVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	if !id.MemberOf(i.td) {
		return nil, fmt.Errorf("spire: %s is not in trust domain %s", id, i.td)
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	s, err := i.subscribeLocked(id)
	if err != nil {
		return nil, err
	}
	for {
		switch {
		case s.value != nil && time.Now().Before(s.value.Certificates[0].NotAfter):
			return s.value, nil
		case s.err != nil:
			return nil, s.err
		case s.answered && s.missing:
			return nil, fmt.Errorf("spire: SVID of %s: %w (the SPIRE agent's entries for selectors %s give %s): register it with these selectors and this node's SPIRE agent as parent",
				id, ErrNotRegistered, joinSelectors(s.selectors), describeIDs(s.got))
		}
		if err := i.waitLocked(ctx, s.changed); err != nil {
			return nil, fmt.Errorf("spire: SVID of %s: waiting for the SPIRE agent: %w", id, err)
		}
	}
}

// waitLocked releases i.mu until changed is closed or ctx ends.
func (i *Issuer) waitLocked(ctx context.Context, changed <-chan struct{}) error {
	i.mu.Unlock()
	defer i.mu.Lock()
	select {
	case <-changed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-i.ctx.Done():
		return ErrClosed
	}
}

// subscribeLocked returns id's subscription, opening it if there is none.
func (i *Issuer) subscribeLocked(id spiffeid.ID) (*subscription, error) {
	if i.closed {
		return nil, ErrClosed
	}
	if s := i.subs[id]; s != nil {
		return s, nil
	}
	sels, err := i.opts.Selectors(id)
	if err != nil {
		return nil, fmt.Errorf("spire: selectors of %s: %w", id, err)
	}
	ctx, cancel := context.WithCancel(i.ctx)
	s := &subscription{watch: newWatch[*x509svid.SVID](cancel), selectors: sels}
	i.subs[id] = s
	i.wg.Go(func() {
		i.keepSubscribed(ctx, "SVIDs of "+id.String(), func(ctx context.Context) error { return i.streamSVIDs(ctx, id, s) }, s.watch)
	})
	return s, nil
}

// Release implements identity.SVIDIssuer: it ends id's subscription.
func (i *Issuer) Release(id spiffeid.ID) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if s := i.subs[id]; s != nil {
		s.cancel()
		delete(i.subs, id)
	}
}

// streamSVIDs runs one subscription of id until it breaks.
func (i *Issuer) streamSVIDs(ctx context.Context, id spiffeid.ID, s *subscription) error {
	req := &delegatedv1.SubscribeToX509SVIDsRequest{}
	for _, sel := range s.selectors {
		req.Selectors = append(req.Selectors, &types.Selector{Type: sel.Type, Value: sel.Value})
	}
	stream, err := i.client.SubscribeToX509SVIDs(ctx, req)
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		svid, got, err := pickSVID(resp, id)
		if err != nil {
			err = fmt.Errorf("spire: SVID of %s: %w", id, err)
		}
		i.mu.Lock()
		old, wasMissing := s.value, s.missing
		s.answered, s.err = true, err
		changed := svid != nil && (old == nil || !old.Certificates[0].Equal(svid.Certificates[0]))
		missing := svid == nil && err == nil
		s.missing, s.got = missing, got
		switch {
		case changed:
			s.value = svid
		case missing:
			// SPIRE does not (or no longer) give this identity to this
			// node; the Manager keeps what it has until it expires.
			s.value = nil
		}
		s.bump()
		notify := i.notify
		i.mu.Unlock()
		switch {
		case err != nil:
			i.log.Error("unusable SVID from SPIRE", "spiffe_id", id.String(), "error", err)
		case changed:
			i.log.Info("SVID from SPIRE", "spiffe_id", id.String(), "serial", svid.Certificates[0].SerialNumber.Text(16),
				"not_after", svid.Certificates[0].NotAfter)
			if notify != nil {
				notify(id)
			}
		case missing && !wasMissing:
			i.log.Warn("SPIRE gives this node no SVID of this identity", "spiffe_id", id.String(),
				"selectors", joinSelectors(s.selectors), "got", describeIDs(got))
		}
	}
}

// pickSVID returns the SVID of id among those of resp, or the SPIFFE IDs
// of the others. An SVID of id that does not parse is an error.
func pickSVID(resp *delegatedv1.SubscribeToX509SVIDsResponse, id spiffeid.ID) (*x509svid.SVID, []string, error) {
	var got []string
	for _, s := range resp.GetX509Svids() {
		x := s.GetX509Svid()
		name := "spiffe://" + x.GetId().GetTrustDomain() + x.GetId().GetPath()
		if name != id.String() {
			got = append(got, name)
			continue
		}
		svid, err := x509svid.ParseRaw(slices.Concat(x.GetCertChain()...), s.GetX509SvidKey())
		if err != nil {
			return nil, nil, fmt.Errorf("the SPIRE agent sent an SVID that does not parse: %w", err)
		}
		if svid.ID != id {
			return nil, nil, fmt.Errorf("the SPIRE agent sent an SVID for %s whose certificate names %s", id, svid.ID)
		}
		return svid, nil, nil
	}
	slices.Sort(got)
	return nil, got, nil
}

// Bundle returns the trust bundle of the Issuer's trust domain as the
// SPIRE agent delivered it last, subscribing to the bundles first if
// needed. Federated bundles the agent also sends are not used.
func (i *Issuer) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.closed {
		return nil, ErrClosed
	}
	if i.bundles == nil {
		bctx, cancel := context.WithCancel(i.ctx)
		w := newWatch[*x509bundle.Bundle](cancel)
		i.bundles = w
		i.wg.Go(func() {
			i.keepSubscribed(bctx, "trust bundles", func(ctx context.Context) error { return i.streamBundles(ctx, w) }, w)
		})
	}
	w := i.bundles
	for {
		switch {
		case w.value != nil:
			return w.value, nil
		case w.err != nil:
			return nil, w.err
		}
		if err := i.waitLocked(ctx, w.changed); err != nil {
			return nil, fmt.Errorf("spire: bundle of %s: waiting for the SPIRE agent: %w", i.td, err)
		}
	}
}

// streamBundles runs one bundle subscription until it breaks.
func (i *Issuer) streamBundles(ctx context.Context, w *watch[*x509bundle.Bundle]) error {
	stream, err := i.client.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		b, err := i.pickBundle(resp)
		i.mu.Lock()
		old := w.value
		w.answered, w.err = true, err
		changed := b != nil && (old == nil || !old.Equal(b))
		if changed {
			w.value = b
		}
		w.bump()
		notify := i.notify
		i.mu.Unlock()
		if err != nil {
			i.log.Error("unusable trust bundles from SPIRE", "error", err)
		}
		if changed {
			i.log.Info("trust bundle from SPIRE", "trust_domain", i.td.Name(), "authorities", len(b.X509Authorities()))
			if notify != nil {
				notify(spiffeid.ID{})
			}
		}
	}
}

// pickBundle returns the bundle of the Issuer's trust domain from resp.
func (i *Issuer) pickBundle(resp *delegatedv1.SubscribeToX509BundlesResponse) (*x509bundle.Bundle, error) {
	var have []string
	for name, der := range resp.GetCaCertificates() {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil || td != i.td {
			have = append(have, name)
			continue
		}
		certs, err := x509.ParseCertificates(der)
		if err != nil {
			return nil, fmt.Errorf("spire: bundle of %s: %w", i.td, err)
		}
		if len(certs) == 0 {
			return nil, fmt.Errorf("spire: bundle of %s: %w (it is empty)", i.td, ErrNoBundle)
		}
		return x509bundle.FromX509Authorities(i.td, certs), nil
	}
	slices.Sort(have)
	return nil, fmt.Errorf("spire: bundle of %s: %w (it has %s): is --trust-domain the SPIRE server's?", i.td, ErrNoBundle, describeIDs(have))
}

// keepSubscribed runs stream until ctx ends, opening it again with
// backoff whenever it breaks; a break is recorded in w, so that callers
// learn why there is nothing (yet).
func (i *Issuer) keepSubscribed(ctx context.Context, what string, stream func(context.Context) error, w interface{ fail(error) }) {
	wait := i.opts.MinBackoff
	for {
		start := time.Now()
		err := stream(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > i.opts.MaxBackoff {
			wait = i.opts.MinBackoff // it worked for a while: a fresh break
		}
		err = i.explain(err)
		i.mu.Lock()
		w.fail(err)
		i.mu.Unlock()
		i.log.Warn("SPIRE subscription broken; opening it again", "subscription", what, "retry_in", wait, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, i.opts.MaxBackoff)
	}
}

// fail records why the subscription is down. Called with Issuer.mu held.
func (w *watch[T]) fail(err error) {
	w.err, w.answered = err, false
	w.bump()
}

// explain turns a subscription's error into one that says what to fix.
func (i *Issuer) explain(err error) error {
	switch status.Code(err) {
	case codes.PermissionDenied:
		who := "mantlet's SPIFFE ID"
		if !i.opts.Delegate.IsZero() {
			who = i.opts.Delegate.String()
		}
		return fmt.Errorf("spire: the SPIRE agent at %s refuses mantlet as a delegate (%s): list %s in its authorized_delegates: %w",
			i.socket, status.Convert(err).Message(), who, err)
	case codes.Unavailable:
		return fmt.Errorf("spire: no SPIRE agent answers on the admin socket %s (is it running, with admin_socket_path set to it?): %w", i.socket, err)
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = errors.New("the SPIRE agent ended the subscription")
	}
	return fmt.Errorf("spire: admin socket %s: %w", i.socket, err)
}

func joinSelectors(sels []Selector) string {
	s := make([]string, len(sels))
	for i, sel := range sels {
		s[i] = sel.String()
	}
	return strings.Join(s, ", ")
}

func describeIDs(ids []string) string {
	if len(ids) == 0 {
		return "nothing"
	}
	return strings.Join(ids, ", ")
}
