package agent

import (
	"fmt"
	"net/http"
)

// ReadyPath is where the readiness probe is served (port 15021).
const ReadyPath = "/healthz/ready"

// Handler serves the readiness probe: GET /healthz/ready answers 200 with
// a one-line summary when Ready, 503 with the reason otherwise.
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ReadyPath, func(w http.ResponseWriter, _ *http.Request) {
		ok, reason := a.Ready()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, reason)
	})
	return mux
}
