package clusterca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

// signTimeout bounds the decision on one sign request (the TokenReview
// is most of it); past it the answer is unavailable.
const signTimeout = 10 * time.Second

// Defaults of Config.
const (
	DefaultSVIDTTL        = 24 * time.Hour
	DefaultReloadEvery    = 5 * time.Second
	DefaultReviewCacheTTL = 10 * time.Second
	DefaultServerTTL      = 24 * time.Hour
)

// Config configures a Server. Client, Namespace, TrustDomain, ServerID and
// Agents are required.
type Config struct {
	// Client reaches the API server: TokenReviews, the pods, the CA's
	// Secret and the bundle's ConfigMap.
	Client kubernetes.Interface
	// Namespace holds the Secret and the ConfigMap (the service's own).
	Namespace string
	// SecretName and BundleConfigMap name them (defaults DefaultSecretName
	// and DefaultBundleConfigMap).
	SecretName, BundleConfigMap string
	// TrustDomain is the CA's: a CA made on first start is for it, an
	// existing one must be.
	TrustDomain spiffeid.TrustDomain
	// Intermediate makes a CA created on first start sign with an
	// intermediate under its root.
	Intermediate bool
	// Audience is the one audience of the agents' tokens accepted
	// (default DefaultAudience).
	Audience string
	// Agents are the service accounts ("namespace/name") whose tokens may
	// ask for SVIDs: the node agents'.
	Agents []string
	// SVIDTTL is the longest lifetime the service signs (default
	// DefaultSVIDTTL); a request asking for less gets less.
	SVIDTTL time.Duration
	// ServerID is the SPIFFE ID of the service's own serving certificate,
	// which agents verify; DNSNames are added to it for other clients.
	ServerID spiffeid.ID
	DNSNames []string
	// Replica names this process in the audit lines (its pod's name).
	Replica string
	// Audit receives one JSON line per sign request (nil: none).
	Audit io.Writer
	// ReloadEvery is how often the Secret is read again, to follow a
	// rotation (default DefaultReloadEvery).
	ReloadEvery time.Duration
	// ReviewCacheTTL is how long an authenticated token's review is kept
	// (default DefaultReviewCacheTTL).
	ReviewCacheTTL time.Duration
	// CallerRate and CallerBurst bound each caller's sign requests: per
	// remote address before its token is reviewed (so a flood of bad
	// tokens does not become a flood of TokenReviews), per node after
	// (defaults DefaultCallerRate, DefaultCallerBurst).
	CallerRate  float64
	CallerBurst int
	// Logger receives the service's logs (nil: discard).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Server is the cluster CA service.
type Server struct {
	cfg     Config
	log     *slog.Logger
	store   *secretStore
	pods    *pods
	review  *reviewer
	agents  map[string]bool
	metrics *metrics
	audit   *auditLog
	// byAddr and byNode rate-limit callers before and after their token
	// is reviewed.
	byAddr, byNode *limiter

	ca    atomic.Pointer[ca.CA]
	files ca.Files // guarded by reloadMu
	// reloadMu serialises reloads.
	reloadMu sync.Mutex

	servingMu sync.Mutex
	serving   *x509svid.SVID
}

// New checks cfg, loads the CA from its Secret (creating both on first
// start) and publishes the trust bundle. Run serves.
func New(ctx context.Context, cfg Config) (*Server, error) {
	switch {
	case cfg.Client == nil || cfg.Namespace == "" || cfg.TrustDomain.IsZero():
		return nil, errors.New("clusterca: config: Client, Namespace and TrustDomain are required")
	case cfg.ServerID.IsZero() || !cfg.ServerID.MemberOf(cfg.TrustDomain):
		return nil, fmt.Errorf("clusterca: config: ServerID %q must be an ID of trust domain %s", cfg.ServerID, cfg.TrustDomain)
	case len(cfg.Agents) == 0:
		return nil, errors.New("clusterca: config: Agents is required (the node agents' service accounts)")
	}
	if cfg.SecretName == "" {
		cfg.SecretName = DefaultSecretName
	}
	if cfg.BundleConfigMap == "" {
		cfg.BundleConfigMap = DefaultBundleConfigMap
	}
	if cfg.Audience == "" {
		cfg.Audience = DefaultAudience
	}
	if cfg.SVIDTTL <= 0 {
		cfg.SVIDTTL = DefaultSVIDTTL
	}
	if cfg.ReloadEvery <= 0 {
		cfg.ReloadEvery = DefaultReloadEvery
	}
	if cfg.ReviewCacheTTL <= 0 {
		cfg.ReviewCacheTTL = DefaultReviewCacheTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CallerRate <= 0 {
		cfg.CallerRate = DefaultCallerRate
	}
	if cfg.CallerBurst <= 0 {
		cfg.CallerBurst = DefaultCallerBurst
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := (ca.Names{DNSNames: cfg.DNSNames}).Check(); err != nil {
		return nil, fmt.Errorf("clusterca: config: DNSNames: %w", err)
	}
	s := &Server{cfg: cfg, log: log, agents: map[string]bool{}, audit: &auditLog{w: cfg.Audit, now: cfg.Now},
		byAddr: newLimiter(cfg.CallerRate, cfg.CallerBurst), byNode: newLimiter(cfg.CallerRate, cfg.CallerBurst)}
	for _, a := range cfg.Agents {
		ns, name, ok := strings.Cut(a, "/")
		if !ok || ns == "" || name == "" {
			return nil, fmt.Errorf("clusterca: config: agent service account %q: want namespace/name", a)
		}
		s.agents[a] = true
	}
	s.store = &secretStore{client: cfg.Client, ns: cfg.Namespace, secret: cfg.SecretName, cmap: cfg.BundleConfigMap, td: cfg.TrustDomain,
		create: ca.Options{Intermediate: cfg.Intermediate, MaxSVIDTTL: cfg.SVIDTTL, Now: cfg.Now},
		labels: map[string]string{"app.kubernetes.io/part-of": "mantlet", "app.kubernetes.io/component": "ca"}}
	c, files, created, err := s.store.load(ctx)
	if err != nil {
		return nil, err
	}
	if created {
		log.Info("created a CA and stored it in a Secret", "secret", cfg.Namespace+"/"+cfg.SecretName, "trust_domain", cfg.TrustDomain.Name(),
			"root", identity.Fingerprint(c.Root()), "intermediate", cfg.Intermediate)
	} else {
		log.Info("loaded the CA from its Secret", "secret", cfg.Namespace+"/"+cfg.SecretName, "trust_domain", cfg.TrustDomain.Name(),
			"root", identity.Fingerprint(c.Root()), "phase", c.Phase().String(), "roots", len(c.Roots()))
	}
	s.ca.Store(c)
	s.files = files
	if err := s.store.publish(ctx, c); err != nil {
		return nil, err
	}
	if s.pods, err = newPods(cfg.Client); err != nil {
		return nil, fmt.Errorf("clusterca: pod informer: %w", err)
	}
	s.review = &reviewer{client: cfg.Client, audience: cfg.Audience, cacheTTL: cfg.ReviewCacheTTL, now: cfg.Now,
		cache: map[[32]byte]cachedReview{}}
	s.metrics = newMetrics(s.ca.Load)
	return s, nil
}

// CA returns the CA in use.
func (s *Server) CA() *ca.CA { return s.ca.Load() }

// Ready says whether the service can decide: the pods are synced.
func (s *Server) Ready() (bool, string) {
	if !s.pods.synced() {
		return false, "the pod informer has not synced yet"
	}
	return true, ""
}

// Run serves the API on ln (TLS is added here) and follows the Secret
// until ctx ends.
func (s *Server) Run(ctx context.Context, ln net.Listener) error {
	s.pods.start(ctx)
	tc := tlsconfig.TLSServerConfig(x509svidSource(s.servingSVID))
	tc.MinVersion = tls.VersionTLS13
	srv := &http.Server{Handler: s.Handler(), TLSConfig: tc, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	t := time.NewTicker(s.cfg.ReloadEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
			return nil
		case err := <-errc:
			return fmt.Errorf("clusterca: serve: %w", err)
		case <-t.C:
			if err := s.Reload(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("reading the CA's Secret failed; the CA in use stays", "error", err)
			}
		}
	}
}

// Reload reads the Secret again and, when it changed, uses the CA it holds
// (a rotation step); it publishes the bundle either way.
func (s *Server) Reload(ctx context.Context) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	c, files, err := s.store.read(ctx)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("clusterca: Secret %s/%s is gone; the CA in use stays", s.cfg.Namespace, s.cfg.SecretName)
	}
	if !files.Equal(s.files) {
		old := s.ca.Load()
		s.ca.Store(c)
		s.files = files
		s.log.Info("the CA's Secret changed; using it", "phase", c.Phase().String(), "roots", len(c.Roots()),
			"root", identity.Fingerprint(c.Root()), "active_root_changed", !old.Root().Equal(c.Root()))
	}
	return s.store.publish(ctx, c)
}

// Bundle returns what BundlePath answers.
func (s *Server) Bundle() BundleResponse {
	c := s.ca.Load()
	b := BundleResponse{TrustDomain: c.TrustDomain().Name(), SigningRoot: identity.Fingerprint(c.Root()), Phase: c.Phase().String()}
	for _, r := range c.Roots() {
		b.Roots = append(b.Roots, r.Raw)
	}
	return b
}

// servingSVID returns the service's own SVID, minting a new one when there
// is none, it is past half its life, or the CA signs under another root.
func (s *Server) servingSVID() (*x509svid.SVID, error) {
	s.servingMu.Lock()
	defer s.servingMu.Unlock()
	c, now := s.ca.Load(), s.cfg.Now()
	if sv := s.serving; sv != nil {
		leaf := sv.Certificates[0]
		issued := leaf.NotBefore.Add(ca.Backdate)
		if now.Before(issued.Add(leaf.NotAfter.Sub(issued)/2)) && chainsTo(sv.Certificates, c.Root()) {
			return sv, nil
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	names := ca.Names{DNSNames: s.cfg.DNSNames}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{s.cfg.ServerID.URL()}}, key)
	if err != nil {
		return nil, err
	}
	chain, err := c.SignCSRWithNames(context.Background(), csr, s.cfg.ServerID, DefaultServerTTL, names)
	if err != nil {
		return nil, fmt.Errorf("clusterca: serving certificate: %w", err)
	}
	s.serving = &x509svid.SVID{ID: s.cfg.ServerID, Certificates: chain, PrivateKey: key}
	return s.serving, nil
}

// chainsTo says whether chain (leaf first, without the root) was issued
// under root.
func chainsTo(chain []*x509.Certificate, root *x509.Certificate) bool {
	return chain[len(chain)-1].CheckSignatureFrom(root) == nil
}

type x509svidSource func() (*x509svid.SVID, error)

func (f x509svidSource) GetX509SVID() (*x509svid.SVID, error) { return f() }

// Handler returns the API (without TLS: Run adds it).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+SignPath, s.sign)
	mux.HandleFunc("GET "+BundlePath, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.Bundle()) })
	return mux
}

// sign answers one SignRequest. Every answer is counted and audited.
func (s *Server) sign(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ev := auditEvent{Replica: s.cfg.Replica, RemoteAddr: r.RemoteAddr}
	// The TokenReview and the signing end with the request, and within
	// signTimeout whatever the client does.
	ctx, cancel := context.WithTimeout(r.Context(), signTimeout)
	defer cancel()
	chain, reason, msg := s.decide(r.WithContext(ctx), &ev)
	ev.Verdict, ev.Reason, ev.Message = "signed", reason.String(), msg
	if reason != ReasonNone {
		ev.Verdict = "refused"
	}
	s.metrics.observe(reason, time.Since(start))
	s.audit.write(ev)
	if reason != ReasonNone {
		if reason != ReasonBadRequest && reason != ReasonNoToken {
			s.log.Info("sign request refused", "reason", reason.String(), "message", msg, "caller_node", ev.CallerNode,
				"caller_pod", ev.CallerPod, "requested_id", ev.RequestedID)
		}
		if reason == ReasonRateLimited {
			w.Header().Set("Retry-After", "1")
		}
		writeJSON(w, reason.status(), ErrorResponse{Reason: reason.String(), Message: msg})
		return
	}
	resp := SignResponse{Bundle: s.Bundle()}
	for _, c := range chain {
		resp.Chain = append(resp.Chain, c.Raw)
	}
	writeJSON(w, http.StatusOK, resp)
}

// decide authenticates and authorizes a sign request and signs it. It
// fills ev with what it learnt.
func (s *Server) decide(r *http.Request, ev *auditEvent) ([]*x509.Certificate, Reason, string) {
	req, id, ttl, perr := ParseSignRequest(r.Body)
	if perr == nil {
		ev.RequestedID = id.String()
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || strings.TrimSpace(token) == "" {
		return nil, ReasonNoToken, "no bearer token: send the node agent's projected service-account token"
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if !s.byAddr.allow(host, s.cfg.Now()) {
		return nil, ReasonRateLimited, fmt.Sprintf("more than %g requests a second (burst %d) from %s", s.cfg.CallerRate, s.cfg.CallerBurst, host)
	}
	c, reason, msg, cached := s.review.review(r.Context(), strings.TrimSpace(token))
	s.metrics.reviewed(reason, cached)
	if reason != ReasonNone {
		return nil, reason, msg
	}
	ev.CallerSA, ev.CallerNode = c.Namespace+"/"+c.ServiceAccount, c.Node
	if c.Pod != "" {
		ev.CallerPod = c.Namespace + "/" + c.Pod
	}
	if !s.agents[c.Namespace+"/"+c.ServiceAccount] {
		return nil, ReasonNotAgent, fmt.Sprintf("service account %s/%s is not a node agent's", c.Namespace, c.ServiceAccount)
	}
	if c.Pod == "" || c.PodUID == "" || c.Node == "" {
		return nil, ReasonNotBound, "the token is not bound to a pod on a node; give the agent a projected service-account token (audience " + s.cfg.Audience + ")"
	}
	if !s.byNode.allow(c.Node, s.cfg.Now()) {
		return nil, ReasonRateLimited, fmt.Sprintf("more than %g requests a second (burst %d) from node %s", s.cfg.CallerRate, s.cfg.CallerBurst, c.Node)
	}
	if ok, why := s.Ready(); !ok {
		return nil, ReasonUnavailable, why
	}
	if !s.pods.agent(c.Namespace, c.Pod, c.PodUID, c.Node) {
		return nil, ReasonAgentPodGone, fmt.Sprintf("pod %s/%s (uid %s) does not run on node %s", c.Namespace, c.Pod, c.PodUID, c.Node)
	}
	if perr != nil {
		return nil, ReasonBadRequest, perr.Error()
	}
	authority := s.ca.Load()
	if !id.MemberOf(authority.TrustDomain()) {
		return nil, ReasonForeignTrustDomain, fmt.Sprintf("%s is not in trust domain %s", id, authority.TrustDomain().Name())
	}
	ns, sa, err := identity.ParseWorkloadID(id)
	if err != nil {
		return nil, ReasonNotWorkloadID, fmt.Sprintf("%s: %v", id, err)
	}
	if !s.pods.running(c.Node, ns, sa) {
		return nil, ReasonNoPodOnNode, fmt.Sprintf("no running pod of namespace %s with service account %s is scheduled on node %s", ns, sa, c.Node)
	}
	if ttl <= 0 || ttl > s.cfg.SVIDTTL {
		ttl = s.cfg.SVIDTTL
	}
	chain, err := authority.SignCSR(r.Context(), req.CSR, id, ttl)
	switch {
	case errors.Is(err, ca.ErrBadCSR) || errors.Is(err, ca.ErrBadID):
		return nil, ReasonBadCSR, err.Error()
	case err != nil:
		return nil, ReasonUnavailable, err.Error()
	}
	leaf := chain[0]
	ev.Serial, ev.NotAfter, ev.Root = leaf.SerialNumber.Text(16), leaf.NotAfter.UTC(), identity.Fingerprint(authority.Root())
	return chain, ReasonNone, ""
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
