package clusterca

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestCallersAreRateLimited: past its burst, a caller is refused
// (rate_limited, 429, Retry-After) and counted, while another caller is
// not; a flood of bad tokens from one address stops costing TokenReviews
// once its address is over the limit.
func TestCallersAreRateLimited(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s, reviews := newFakeServerCounting(t, func(c *Config) {
		c.CallerRate, c.CallerBurst = 1, 3
		c.Now = func() time.Time { return now }
	})
	cart, _ := url.Parse("spiffe://cluster.local/ns/shop/sa/cart")
	body, _ := json.Marshal(SignRequest{SPIFFEID: cart.String(), CSR: fuzzCSR(t, &x509.CertificateRequest{}), TTLSeconds: 3600})
	send := func(addr, token string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, SignPath, bytes.NewReader(body))
		r.RemoteAddr = addr
		r.Header.Set("Authorization", "Bearer "+token)
		w := httptest.NewRecorder()
		s.Handler().ServeHTTP(w, r)
		return w
	}
	for i := range 3 {
		if w := send("10.0.0.1:4000", fuzzToken); w.Code != http.StatusOK {
			t.Fatalf("request %d within the burst: %d %s", i, w.Code, w.Body)
		}
	}
	w := send("10.0.0.1:4001", fuzzToken)
	if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") == "" {
		t.Fatalf("past the burst: %d (Retry-After %q), want 429 with Retry-After", w.Code, w.Header().Get("Retry-After"))
	}
	var e ErrorResponse
	if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Reason != "rate_limited" {
		t.Fatalf("refusal %s: reason %q", w.Body, e.Reason)
	}
	if got := testutil.ToFloat64(s.metrics.requests.WithLabelValues("refused", "rate_limited")); got != 1 {
		t.Errorf("rate_limited counted %v times, want 1", got)
	}
	// The same node from another address is the same caller once its
	// token is reviewed.
	if w := send("10.0.0.2:4000", fuzzToken); w.Code != http.StatusTooManyRequests {
		t.Errorf("node1 from another address: %d, want 429", w.Code)
	}
	// A second later, one more token.
	now = now.Add(time.Second)
	if w := send("10.0.0.3:4000", fuzzToken); w.Code != http.StatusOK {
		t.Errorf("a second later: %d %s", w.Code, w.Body)
	}

	before := reviews.Load()
	for range 50 {
		send("10.0.0.9:4000", "bad-token")
	}
	if n := reviews.Load() - before; n != 3 {
		t.Errorf("50 bad tokens from one address cost %d TokenReviews, want the burst of 3", n)
	}
}
