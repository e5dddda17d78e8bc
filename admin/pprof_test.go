package admin_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/admin/admintest"
)

// get fetches path from the admin API through dial.
func get(t *testing.T, dial func(ctx context.Context, _, _ string) (net.Conn, error), path string) (int, []byte) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: dial}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://admin" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func TestProfilesOnTheSocketAndLoopback(t *testing.T) {
	f := admintest.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- f.Server.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	var d net.Dialer
	dials := map[string]func(ctx context.Context, _, _ string) (net.Conn, error){
		"unix socket": func(ctx context.Context, _, _ string) (net.Conn, error) { return d.DialContext(ctx, "unix", f.Addr) },
		"loopback": func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", ln.Addr().String())
		},
	}
	for name, dial := range dials {
		code, body := get(t, dial, "/debug/pprof/heap")
		if code != http.StatusOK || !bytes.HasPrefix(body, []byte{0x1f, 0x8b}) {
			t.Errorf("%s: heap profile: %d, %.80q; want 200 and a gzipped profile", name, code, body)
		}
		code, body = get(t, dial, "/debug/pprof/goroutine?debug=1")
		if code != http.StatusOK || !strings.Contains(string(body), "goroutine profile:") {
			t.Errorf("%s: goroutine dump: %d, %.80q", name, code, body)
		}
		code, body = get(t, dial, "/debug/pprof/")
		if code != http.StatusOK || !strings.Contains(string(body), "allocs") {
			t.Errorf("%s: index: %d, %.80q", name, code, body)
		}
	}
}

func TestProfilesRefusedOffLoopback(t *testing.T) {
	f := admintest.New(t)
	for _, local := range []net.Addr{
		&net.TCPAddr{IP: net.ParseIP("198.18.0.1"), Port: 15000},
		&net.TCPAddr{IP: net.ParseIP("::"), Port: 15000},
		nil,
	} {
		r := httptest.NewRequest("GET", "/debug/pprof/heap", nil)
		r = r.WithContext(context.WithValue(r.Context(), http.LocalAddrContextKey, local))
		w := httptest.NewRecorder()
		f.Server.Handler().ServeHTTP(w, r)
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "only on the admin unix socket and on loopback") {
			t.Errorf("arrived on %v: %d %s; want 403 saying where profiles are served", local, w.Code, w.Body)
		}
		r = httptest.NewRequest("GET", "/v1/status", nil)
		r = r.WithContext(context.WithValue(r.Context(), http.LocalAddrContextKey, local))
		w = httptest.NewRecorder()
		f.Server.Handler().ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			t.Errorf("arrived on %v: /v1/status %d; the API itself is not limited", local, w.Code)
		}
	}
}
