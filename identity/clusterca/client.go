package clusterca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/mantlet/mantlet/identity"
)

// Defaults of ClientConfig.
const (
	DefaultTokenFile     = "/var/run/secrets/mantlet/ca/token"
	DefaultClientTimeout = 10 * time.Second
	DefaultBundleEvery   = 5 * time.Second
)

// ClientConfig configures a Client. Addr, TrustDomain, ServerID and
// BundleFile are required.
type ClientConfig struct {
	// Addr is the service's host:port.
	Addr string
	// TrustDomain is the identities' (and the service's).
	TrustDomain spiffeid.TrustDomain
	// ServerID is the SPIFFE ID the service's certificate must carry.
	ServerID spiffeid.ID
	// TokenFile holds the agent's projected service-account token for the
	// service's audience; it is read for every request, as the kubelet
	// replaces it (default DefaultTokenFile).
	TokenFile string
	// BundleFile holds the trust bundle (PEM): the service's ConfigMap,
	// mounted. It is read again when it changes.
	BundleFile string
	// Timeout bounds one request (default DefaultClientTimeout).
	Timeout time.Duration
	// BundleEvery is how often, at most, Bundle asks the service (default
	// DefaultBundleEvery); in between it answers from memory and the file.
	BundleEvery time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Client is the node agent's side of the cluster CA: an identity.Issuer
// (and SigningRooter) that sends certificate requests to the service,
// authenticated with the agent's token. Its trust bundle is the union of
// the mounted file and what the service last said (over TLS verified
// against that bundle), so a new root is trusted as soon as either has it
// and an old one is dropped once both have dropped it. When the service
// cannot be reached, the bundle stays what it was; the identity Manager
// keeps serving its SVIDs and retries.
type Client struct {
	cfg   ClientConfig
	httpc *http.Client

	mu        sync.Mutex
	fileRaw   []byte
	fileRoots []*x509.Certificate
	fileErr   error
	served    []*x509.Certificate // the service's last bundle
	signing   string              // fingerprint of the service's signing root
	fetched   time.Time           // when the service last answered BundlePath
}

// NewClient returns a Client. The bundle file must be readable now: it is
// what the service's certificate is verified against.
func NewClient(cfg ClientConfig) (*Client, error) {
	switch {
	case cfg.Addr == "" || cfg.BundleFile == "" || cfg.TrustDomain.IsZero():
		return nil, errors.New("clusterca: client: Addr, BundleFile and TrustDomain are required")
	case !cfg.ServerID.MemberOf(cfg.TrustDomain):
		return nil, fmt.Errorf("clusterca: client: the service's ID %q is not of trust domain %s", cfg.ServerID, cfg.TrustDomain)
	}
	if cfg.TokenFile == "" {
		cfg.TokenFile = DefaultTokenFile
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultClientTimeout
	}
	if cfg.BundleEvery <= 0 {
		cfg.BundleEvery = DefaultBundleEvery
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Client{cfg: cfg}
	c.readFile()
	if c.fileErr != nil {
		return nil, c.fileErr
	}
	tc := tlsconfig.TLSClientConfig(c, tlsconfig.AuthorizeID(cfg.ServerID))
	tc.MinVersion = tls.VersionTLS13
	c.httpc = &http.Client{Timeout: cfg.Timeout, Transport: &http.Transport{
		TLSClientConfig: tc, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 4, IdleConnTimeout: time.Minute,
		TLSHandshakeTimeout: cfg.Timeout,
	}}
	return c, nil
}

// readFile reads the bundle file again if it changed; a file that does not
// parse keeps the last good roots (fileErr says why).
func (c *Client) readFile() {
	raw, err := os.ReadFile(c.cfg.BundleFile)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil && bytes.Equal(raw, c.fileRaw) {
		return
	}
	var roots []*x509.Certificate
	if err == nil {
		roots, err = parseRoots(raw)
	}
	if err != nil {
		c.fileErr = fmt.Errorf("clusterca: trust bundle %s: %w", c.cfg.BundleFile, err)
		return
	}
	c.fileRaw, c.fileRoots, c.fileErr = raw, roots, nil
}

func parseRoots(raw []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for rest := raw; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, cert)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate in it")
	}
	return out, nil
}

// roots is the union of the file's roots and the service's.
func (c *Client) rootsLocked() []*x509.Certificate {
	out := slices.Clone(c.fileRoots)
	for _, r := range c.served {
		if !slices.ContainsFunc(out, r.Equal) {
			out = append(out, r)
		}
	}
	return out
}

// GetX509BundleForTrustDomain serves the bundle as it stands, without
// asking anyone (go-spiffe's x509bundle.Source; it verifies the service).
func (c *Client) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != c.cfg.TrustDomain {
		return nil, fmt.Errorf("clusterca: no bundle for trust domain %s", td)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return x509bundle.FromX509Authorities(td, c.rootsLocked()), nil
}

// Bundle reads the file again if it changed and, at most every
// BundleEvery, asks the service; it fails only when it has no root at all.
func (c *Client) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	c.readFile()
	c.mu.Lock()
	due := c.cfg.Now().Sub(c.fetched) >= c.cfg.BundleEvery
	c.mu.Unlock()
	var ferr error
	if due {
		ferr = c.fetchBundle(ctx)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	roots := c.rootsLocked()
	if len(roots) == 0 {
		return nil, errors.Join(c.fileErr, ferr, errors.New("clusterca: no trust bundle"))
	}
	return x509bundle.FromX509Authorities(c.cfg.TrustDomain, roots), nil
}

// SigningRoot returns the root the service last said it signs under (nil
// before it answered once).
func (c *Client) SigningRoot(context.Context) (*x509.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.rootsLocked() {
		if identity.Fingerprint(r) == c.signing {
			return r, nil
		}
	}
	return nil, nil
}

func (c *Client) fetchBundle(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+c.cfg.Addr+BundlePath, nil)
	if err != nil {
		return err
	}
	var b BundleResponse
	if err := c.do(req, &b); err != nil {
		return fmt.Errorf("clusterca: bundle from %s: %w", c.cfg.Addr, err)
	}
	return c.takeBundle(b)
}

// takeBundle keeps what the service said about the bundle.
func (c *Client) takeBundle(b BundleResponse) error {
	if b.TrustDomain != c.cfg.TrustDomain.Name() {
		return fmt.Errorf("clusterca: the service's bundle is of trust domain %q, not %s", b.TrustDomain, c.cfg.TrustDomain)
	}
	var roots []*x509.Certificate
	for _, der := range b.Roots {
		r, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("clusterca: the service's bundle: %w", err)
		}
		roots = append(roots, r)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.served, c.signing, c.fetched = roots, b.SigningRoot, c.cfg.Now()
	return nil
}

// SignCSR sends a certificate request for id to the service. A refusal is
// a *RefusedError (wrapped).
func (c *Client) SignCSR(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	token, err := os.ReadFile(c.cfg.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("clusterca: sign %s: the agent's token: %w", id, err)
	}
	body, err := json.Marshal(SignRequest{SPIFFEID: id.String(), CSR: csrDER, TTLSeconds: int64(ttl / time.Second)})
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+c.cfg.Addr+SignPath, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	var resp SignResponse
	if err := c.do(req, &resp); err != nil {
		return nil, fmt.Errorf("clusterca: sign %s at %s: %w", id, c.cfg.Addr, err)
	}
	if err := c.takeBundle(resp.Bundle); err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for _, der := range resp.Chain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("clusterca: sign %s: the service's answer: %w", id, err)
		}
		chain = append(chain, cert)
	}
	return chain, nil
}

// do sends req and decodes a 200 answer into out; any other answer is a
// *RefusedError.
func (c *Client) do(req *http.Request, out any) error {
	resp, err := c.httpc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e ErrorResponse
		if json.Unmarshal(body, &e) != nil || e.Reason == "" {
			return fmt.Errorf("%s: %.200s", resp.Status, body)
		}
		r, ok := ParseReason(e.Reason)
		if !ok || r == ReasonNone {
			r = ReasonUnavailable // a reason of a newer service
		}
		return &RefusedError{Reason: r, Message: e.Message}
	}
	return json.Unmarshal(body, out)
}
