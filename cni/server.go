package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Path is the HTTP path of the exchange on the agent's socket.
const Path = "/v1/pod"

// Enroller is the agent's side of the exchange.
type Enroller interface {
	// Add returns once the pod of r is enrolled (its veth captured) or
	// known not to be meshed, or fails: the plugin then fails the ADD and
	// the runtime does not start the pod. It is also asked for CHECK.
	Add(ctx context.Context, r *Request) (Response, error)
	// Del is told that the pod's sandbox is gone.
	Del(ctx context.Context, r *Request) error
}

// ServerOptions tune Serve; the zero value is ready to use.
type ServerOptions struct {
	// AddTimeout bounds an ADD (default 25s, below the plugin's
	// DefaultTimeout, so that the plugin gets the agent's reason).
	AddTimeout time.Duration
	// MaxInFlight bounds the requests served at once (default 64); more
	// wait for a turn.
	MaxInFlight int
	// Logger receives each request's outcome; nil discards.
	Logger *slog.Logger
}

// Listen makes the unix socket at path (its folder if need be, a stale
// socket of an earlier agent removed), for root only.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("cni: socket folder: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cni: remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("cni: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cni: socket mode: %w", err)
	}
	return ln, nil
}

// Serve answers the plugin on ln until ctx ends; it returns nil then.
func Serve(ctx context.Context, ln net.Listener, e Enroller, opts ServerOptions) error {
	if opts.AddTimeout <= 0 {
		opts.AddTimeout = 25 * time.Second
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 64
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &handler{e: e, opts: opts, log: log, slots: make(chan struct{}, opts.MaxInFlight)}
	mux := http.NewServeMux()
	mux.Handle("POST "+Path, h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			srv.Close()
		case <-done:
		}
	}()
	err := srv.Serve(ln)
	close(done)
	if errors.Is(err, http.ErrServerClosed) || ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("cni: serve: %w", err)
}

type handler struct {
	e     Enroller
	opts  ServerOptions
	log   *slog.Logger
	slots chan struct{}
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var req Request
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
		h.answer(w, http.StatusBadRequest, Response{Error: "cni: decode request: " + err.Error()})
		return
	}
	if req.Namespace == "" || req.Name == "" {
		h.answer(w, http.StatusBadRequest, Response{Error: "cni: request names no pod (K8S_POD_NAMESPACE, K8S_POD_NAME)"})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.opts.AddTimeout)
	defer cancel()
	select {
	case h.slots <- struct{}{}:
		defer func() { <-h.slots }()
	case <-ctx.Done():
		h.answer(w, http.StatusServiceUnavailable, Response{Error: "cni: agent busy: " + ctx.Err().Error()})
		return
	}
	start := time.Now()
	switch req.Command {
	case Add, Check:
		resp, err := h.e.Add(ctx, &req)
		took := time.Since(start).Round(time.Millisecond)
		if err != nil {
			h.log.Warn("cni: pod not enrolled; its sandbox fails and the runtime retries", "pod", req.Pod(), "command", req.Command, "error", err, "took", took)
			h.answer(w, http.StatusServiceUnavailable, Response{Error: err.Error()})
			return
		}
		h.log.Info("cni: pod answered", "pod", req.Pod(), "command", req.Command, "meshed", resp.Meshed, "ifindex", resp.Ifindex, "ips", req.IPs, "took", took)
		h.answer(w, http.StatusOK, resp)
	case Del:
		if err := h.e.Del(ctx, &req); err != nil {
			h.log.Warn("cni: delete", "pod", req.Pod(), "error", err)
		}
		h.answer(w, http.StatusOK, Response{})
	default:
		h.answer(w, http.StatusBadRequest, Response{Error: fmt.Sprintf("cni: unknown command %q", req.Command)})
	}
}

func (h *handler) answer(w http.ResponseWriter, code int, resp Response) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(resp)
}
