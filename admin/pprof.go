package admin

import (
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
)

// The Go profiler, under /debug/pprof/ on the admin API. Profiles show the
// agent's internals (goroutine stacks hold peer addresses and identities),
// so they are answered only on the unix socket and on loopback TCP: an
// admin address set to a routable IP still serves /v1 but refuses
// /debug/pprof with 403.
func (s *Server) handleProfiles() {
	s.mux.Handle("GET /debug/pprof/", localOnly(http.HandlerFunc(profileIndex)))
	s.mux.Handle("GET /debug/pprof/cmdline", localOnly(http.HandlerFunc(pprof.Cmdline)))
	s.mux.Handle("GET /debug/pprof/profile", localOnly(http.HandlerFunc(pprof.Profile)))
	s.mux.Handle("GET /debug/pprof/symbol", localOnly(http.HandlerFunc(pprof.Symbol)))
	s.mux.Handle("GET /debug/pprof/trace", localOnly(http.HandlerFunc(pprof.Trace)))
}

// profileIndex serves the index and the named profiles (heap, allocs,
// goroutine, ...), as net/http/pprof's Index does for its own prefix.
func profileIndex(w http.ResponseWriter, r *http.Request) {
	if name := strings.TrimPrefix(r.URL.Path, "/debug/pprof/"); name != "" {
		pprof.Handler(name).ServeHTTP(w, r)
		return
	}
	pprof.Index(w, r)
}

// localOnly refuses requests that did not arrive on a unix socket or a
// loopback address.
func localOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isLocal(r.Context().Value(http.LocalAddrContextKey)) {
			writeError(w, http.StatusForbidden, "profiles are served only on the admin unix socket and on loopback addresses")
			return
		}
		h.ServeHTTP(w, r)
	})
}

func isLocal(v any) bool {
	switch a := v.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	}
	return false
}
