package clusterca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// The fuzz target drives the whole sign endpoint in-process. The API
// server is client-go's fake with a TokenReview answer: the real one is
// what clusterca_test.go runs against; here the input is what is tested.
const fuzzToken = "agent-token"

func fuzzServer(f *testing.F) *Server { return newFakeServer(f, nil) }

// newFakeServer runs a Server against client-go's fake API: the agent
// mantlet-system/agent-1 on node1 (whose token is fuzzToken), shop/cart on
// node1, shop/pay on node2. edit, if not nil, changes the Config. It
// returns the Server and counts the TokenReviews in reviews.
func newFakeServer(f testing.TB, edit func(*Config)) *Server {
	s, _ := newFakeServerCounting(f, edit)
	return s
}

func newFakeServerCounting(f testing.TB, edit func(*Config)) (*Server, *atomic.Int64) {
	reviews := new(atomic.Int64)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	running := func(ns, name, sa, node string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name)},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	}
	client := fake.NewClientset(running("mantlet-system", "agent-1", "mantlet-agent", "node1"),
		running("shop", "cart-1", "cart", "node1"), running("shop", "pay-1", "pay", "node2"))
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		reviews.Add(1)
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview)
		out := tr.DeepCopy()
		if tr.Spec.Token == fuzzToken {
			out.Status = authnv1.TokenReviewStatus{Authenticated: true, Audiences: tr.Spec.Audiences, User: authnv1.UserInfo{
				Username: "system:serviceaccount:mantlet-system:mantlet-agent",
				Extra:    map[string]authnv1.ExtraValue{ExtraPodName: {"agent-1"}, ExtraPodUID: {"uid-agent-1"}, ExtraNodeName: {"node1"}}}}
		} else {
			out.Status = authnv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, out, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	f.Cleanup(cancel)
	cfg := Config{Client: client, Namespace: "mantlet-system", TrustDomain: td, Intermediate: true,
		Agents: []string{"mantlet-system/mantlet-agent"}, ServerID: spiffeid.RequireFromString("spiffe://cluster.local/ns/mantlet-system/sa/mantlet-ca"),
		CallerRate: 1e9, CallerBurst: 1 << 30}
	if edit != nil {
		edit(&cfg)
	}
	s, err := New(ctx, cfg)
	if err != nil {
		f.Fatal(err)
	}
	s.pods.start(ctx)
	for !s.pods.synced() {
		time.Sleep(time.Millisecond)
	}
	return s, reviews
}

func fuzzCSR(f testing.TB, tmpl *x509.CertificateRequest) []byte {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		f.Fatal(err)
	}
	return der
}

// FuzzSignEndpoint feeds the sign endpoint arbitrary bodies with an
// agent's valid token or a bad one. Whatever comes in, the answer is a
// refusal with a known reason and status, or an SVID for exactly the
// requested identity of a pod on the agent's node, for the request's key,
// that go-spiffe verifies against the bundle.
func FuzzSignEndpoint(f *testing.F) {
	s := fuzzServer(f)
	cart, _ := url.Parse("spiffe://cluster.local/ns/shop/sa/cart")
	pay, _ := url.Parse("spiffe://cluster.local/ns/shop/sa/pay")
	for _, seed := range []struct {
		id   string
		tmpl *x509.CertificateRequest
	}{
		{"spiffe://cluster.local/ns/shop/sa/cart", &x509.CertificateRequest{}},
		{"spiffe://cluster.local/ns/shop/sa/cart", &x509.CertificateRequest{URIs: []*url.URL{cart}}},
		{"spiffe://cluster.local/ns/shop/sa/cart", &x509.CertificateRequest{URIs: []*url.URL{cart, pay}}},
		{"spiffe://cluster.local/ns/shop/sa/pay", &x509.CertificateRequest{}},
		{"spiffe://other.td/ns/shop/sa/cart", &x509.CertificateRequest{}},
		{"spiffe://cluster.local/vm/db", &x509.CertificateRequest{DNSNames: []string{"db"}}},
	} {
		body, _ := json.Marshal(SignRequest{SPIFFEID: seed.id, CSR: fuzzCSR(f, seed.tmpl), TTLSeconds: 3600})
		f.Add(body, true)
		f.Add(body, false)
	}
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"MIIB"}`), true)
	f.Add([]byte(`{"spiffe_id":1}`), true)
	f.Add([]byte(`[]`), true)

	bundle := s.Bundle()
	f.Fuzz(func(t *testing.T, body []byte, goodToken bool) {
		r := httptest.NewRequest(http.MethodPost, SignPath, bytes.NewReader(body))
		token := "not-a-token"
		if goodToken {
			token = fuzzToken
		}
		r.Header.Set("Authorization", "Bearer "+token)
		w := httptest.NewRecorder()
		s.Handler().ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			var e ErrorResponse
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil {
				t.Fatalf("status %d with a body that is no ErrorResponse: %q", w.Code, w.Body.Bytes())
			}
			reason, ok := ParseReason(e.Reason)
			if !ok || reason == ReasonNone || reason.status() != w.Code {
				t.Fatalf("status %d, reason %q", w.Code, e.Reason)
			}
			if !goodToken && reason != ReasonUnauthenticated {
				t.Fatalf("a bad token was refused for %s, not as unauthenticated", reason)
			}
			return
		}
		if !goodToken {
			t.Fatal("signed with a bad token")
		}
		req, id, _, err := ParseSignRequest(bytes.NewReader(body))
		if err != nil {
			t.Fatalf("signed a request that does not parse: %v", err)
		}
		if id.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
			t.Fatalf("signed %s for an agent on node1", id)
		}
		var resp SignResponse
		if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil {
			t.Fatal(err)
		}
		var chain []*x509.Certificate
		for _, der := range resp.Chain {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			chain = append(chain, c)
		}
		var roots []*x509.Certificate
		for _, der := range bundle.Roots {
			c, _ := x509.ParseCertificate(der)
			roots = append(roots, c)
		}
		got, _, err := x509svid.Verify(chain, bundleOf(id.TrustDomain(), roots))
		if err != nil || got != id {
			t.Fatalf("signed chain verifies as %s, %v", got, err)
		}
		csr, err := x509.ParseCertificateRequest(req.CSR)
		if err != nil {
			t.Fatal(err)
		}
		if !chain[0].PublicKey.(*ecdsa.PublicKey).Equal(csr.PublicKey) {
			t.Fatal("signed another key than the request's")
		}
		if len(chain[0].URIs) != 1 || len(chain[0].DNSNames)+len(chain[0].IPAddresses) != 0 {
			t.Fatalf("leaf names %v %v %v", chain[0].URIs, chain[0].DNSNames, chain[0].IPAddresses)
		}
	})
}

func bundleOf(td spiffeid.TrustDomain, roots []*x509.Certificate) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, roots)
}

// FuzzParseSignRequest: ParseSignRequest never panics, and what it accepts
// is a SPIFFE ID, a CSR present and a TTL in range, read from at most
// MaxRequestBytes.
func FuzzParseSignRequest(f *testing.F) {
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"MIIB","ttl_seconds":3600}`))
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"MIIB"} {}`))
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"MIIB","ttl_seconds":-1}`))
	f.Add([]byte(`{"spiffe_id":"spiffe://Cluster.local/ns/shop/sa/cart","csr":"MIIB"}`))
	f.Add([]byte(`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"MIIB","x":1}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		req, id, ttl, err := ParseSignRequest(bytes.NewReader(body))
		if err != nil {
			return
		}
		if len(body) > MaxRequestBytes {
			t.Fatalf("accepted %d bytes", len(body))
		}
		if id.String() != req.SPIFFEID || len(req.CSR) == 0 || ttl < 0 || ttl > 10*365*24*time.Hour {
			t.Fatalf("accepted %+v as %s, ttl %v", req, id, ttl)
		}
	})
}
