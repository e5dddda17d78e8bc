// Package spiretest runs a real SPIRE server and SPIRE agents for tests:
// the server (SQLite data store, in-memory keys, join-token node
// attestation) in one network namespace, typically the testbed's control
// plane, and one agent per node in the node's namespace, with the unix
// workload attestor and a Delegated Identity API on an admin socket. A
// test registers entries with CreateEntry and points mantlet's agents at
// each SPIRE agent's sockets. The binaries come from spirebin (`make
// spire-binaries`).
package spiretest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/proc"
	"github.com/mantlet/mantlet/internal/spiretest/spirebin"
)

// DefaultReadyTimeout bounds how long Start and StartAgent wait for a
// process to answer its health check.
const DefaultReadyTimeout = 60 * time.Second

// Options configure Start.
type Options struct {
	// Binaries to run; spirebin.Find when nil.
	Binaries *spirebin.Binaries
	// TrustDomain of the server (default cluster.local).
	TrustDomain spiffeid.TrustDomain
	// NetNS is the path of the network namespace the server runs in
	// (through nsenter); empty runs it in the caller's.
	NetNS string
	// Listen is the server's address for agents, in NetNS (required).
	Listen netip.AddrPort
	// ReadyTimeout bounds the waits for health (default DefaultReadyTimeout).
	ReadyTimeout time.Duration
	// Log receives what the harness does (default: discard).
	Log *slog.Logger
}

// Server is a running SPIRE server and the agents started through it.
type Server struct {
	opts     Options
	td       spiffeid.TrustDomain
	dir      string // removed by Stop: configs, data, sockets, logs
	socket   string // the server API's unix socket
	launcher *proc.Launcher
	run      proc.Command  // how the server is started (Restart starts it again)
	proc     *proc.Process // guarded by mu after Start

	mu     sync.Mutex
	agents []*Agent
	bundle []byte // PEM, as 'bundle show' printed it at start
}

// Agent is a running SPIRE agent.
type Agent struct {
	// Name is the name StartAgent was given (a node's).
	Name string
	// ID is the agent's SPIFFE ID: spiffe://<td>/spire/agent/join_token/<token>.
	// Entries of its workloads name it as parent.
	ID spiffeid.ID
	// WorkloadSocket serves the Workload API; AdminSocket the Delegated
	// Identity API.
	WorkloadSocket, AdminSocket string
	run                         proc.Command
	proc                        *proc.Process // guarded by Server.mu
}

// AgentOptions configure StartAgent.
type AgentOptions struct {
	// NetNS is the path of the network namespace the agent runs in (a
	// node's); empty runs it in the caller's.
	NetNS string
	// AuthorizedDelegates may use the Delegated Identity API.
	AuthorizedDelegates []spiffeid.ID
}

// Entry is a registration entry.
type Entry struct {
	// ID is the SPIFFE ID the entry gives; Parent the agent (or node
	// alias) that may hand it out.
	ID, Parent spiffeid.ID
	// Selectors a workload must show, written type:value (k8s:ns:shop).
	Selectors []string
	// X509SVIDTTL is the lifetime of its X509-SVIDs (default the
	// server's, 1h).
	X509SVIDTTL time.Duration
}

// RequireBinaries returns the binaries spirebin.Find finds. If they are not
// built it skips t with a message that says how to build them, or, under
// CI=true (where .ci/run builds them before the tests), fails t.
func RequireBinaries(t testing.TB) spirebin.Binaries {
	t.Helper()
	b, err := spirebin.Find()
	switch {
	case errors.Is(err, spirebin.ErrMissing) && privtest.InCI():
		t.Fatalf("%s needs SPIRE, and CI builds it before the tests (.ci/run): %v", t.Name(), err)
	case errors.Is(err, spirebin.ErrMissing):
		t.Skipf("%s needs SPIRE: %v", t.Name(), err)
	case err != nil:
		t.Fatalf("%s needs SPIRE: %v", t.Name(), err)
	}
	return b
}

// Start starts a SPIRE server and waits until it is healthy and has made
// its CA; ctx bounds the wait, not the server, which runs until Stop. If
// anything fails, everything started is removed and the error says what
// failed, with the end of the server's log.
func Start(ctx context.Context, opts Options) (s *Server, err error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = DefaultReadyTimeout
	}
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")
	}
	if !opts.Listen.IsValid() {
		return nil, errors.New("spiretest: Options.Listen is required")
	}
	if opts.Binaries == nil {
		b, err := spirebin.Find()
		if err != nil {
			return nil, err
		}
		opts.Binaries = &b
	}
	// A short folder: unix socket paths must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "spire-")
	if err != nil {
		return nil, fmt.Errorf("spiretest: run folder: %w", err)
	}
	s = &Server{opts: opts, td: opts.TrustDomain, dir: dir, socket: filepath.Join(dir, "server", "api.sock"), launcher: proc.NewLauncher()}
	defer func() {
		if err != nil {
			err = errors.Join(err, s.Stop())
			s = nil
		}
	}()
	data := filepath.Join(dir, "server", "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return s, fmt.Errorf("spiretest: %w", err)
	}
	conf := filepath.Join(dir, "server", "server.conf")
	if err := os.WriteFile(conf, []byte(serverConf(opts, s.socket, data)), 0o600); err != nil {
		return s, fmt.Errorf("spiretest: %w", err)
	}
	start := time.Now()
	s.run = proc.Command{Name: "spire-server", Netns: opts.NetNS, Dir: dir, LogPath: filepath.Join(dir, "server.log"), Append: true,
		Argv: []string{opts.Binaries.Server, "run", "-config", conf}}
	if s.proc, err = s.launcher.Start(s.run); err != nil {
		return s, fmt.Errorf("spiretest: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, opts.ReadyTimeout)
	defer cancel()
	if err := s.waitHealthy(wctx, s.proc, opts.Binaries.Server, "healthcheck", "-socketPath", s.socket); err != nil {
		return s, err
	}
	if s.bundle, err = s.cli(wctx, "bundle", "show"); err != nil {
		return s, err
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle.pem"), s.bundle, 0o644); err != nil {
		return s, fmt.Errorf("spiretest: %w", err)
	}
	opts.Log.Info("SPIRE server ready", "listen", opts.Listen, "trust_domain", s.td.Name(), "took", time.Since(start).Round(time.Millisecond))
	return s, nil
}

func serverConf(opts Options, socket, data string) string {
	return fmt.Sprintf(`server {
    bind_address = %q
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    ca_ttl = "24h"
    default_x509_svid_ttl = "1h"
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = %q
        }
    }
}
`, opts.Listen.Addr().String(), opts.Listen.Port(), socket, opts.TrustDomain.Name(), data, filepath.Join(data, "datastore.sqlite3"), filepath.Join(data, "keys.json"))
}

// TrustDomain returns the server's trust domain.
func (s *Server) TrustDomain() spiffeid.TrustDomain { return s.td }

// Bundle returns the server's trust bundle as it was at start.
func (s *Server) Bundle() (*x509bundle.Bundle, error) {
	var certs []*x509.Certificate
	rest := s.bundle
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("spiretest: bundle: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("spiretest: bundle: no certificate")
	}
	return x509bundle.FromX509Authorities(s.td, certs), nil
}

// StartAgent attests a new SPIRE agent called name with a join token and
// waits until its Workload API answers.
func (s *Server) StartAgent(ctx context.Context, name string, opts AgentOptions) (*Agent, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.ReadyTimeout)
	defer cancel()
	out, err := s.cli(ctx, "token", "generate", "-ttl", "600")
	if err != nil {
		return nil, err
	}
	// "Token: <token>", then a warning that the token names no SPIFFE ID
	// (the agent's join_token ID is used).
	first, _, _ := strings.Cut(string(out), "\n")
	token, ok := strings.CutPrefix(strings.TrimSpace(first), "Token: ")
	if !ok || token == "" || strings.ContainsAny(token, " \t") {
		return nil, fmt.Errorf("spiretest: token generate printed %q", out)
	}
	id, err := spiffeid.FromSegments(s.td, "spire", "agent", "join_token", token)
	if err != nil {
		return nil, fmt.Errorf("spiretest: agent ID: %w", err)
	}
	dir := filepath.Join(s.dir, name)
	a := &Agent{Name: name, ID: id, WorkloadSocket: filepath.Join(dir, "public", "api.sock"), AdminSocket: filepath.Join(dir, "admin", "admin.sock")}
	for _, d := range []string{filepath.Join(dir, "data"), filepath.Dir(a.WorkloadSocket), filepath.Dir(a.AdminSocket)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("spiretest: %w", err)
		}
	}
	var delegates []string
	for _, d := range opts.AuthorizedDelegates {
		delegates = append(delegates, strconv.Quote(d.String()))
	}
	conf := filepath.Join(dir, "agent.conf")
	body := fmt.Sprintf(`agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = %q
    server_port = "%d"
    socket_path = %q
    admin_socket_path = %q
    trust_bundle_path = %q
    trust_domain = %q
    join_token = %q
    authorized_delegates = [%s]
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = %q
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = true
            workload_size_limit = -1
        }
    }
}
`, filepath.Join(dir, "data"), s.opts.Listen.Addr().String(), s.opts.Listen.Port(), a.WorkloadSocket, a.AdminSocket,
		filepath.Join(s.dir, "bundle.pem"), s.td.Name(), token, strings.Join(delegates, ", "), filepath.Join(dir, "data"))
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return nil, fmt.Errorf("spiretest: %w", err)
	}
	start := time.Now()
	a.run = proc.Command{Name: "spire-agent " + name, Netns: opts.NetNS, Dir: dir, LogPath: filepath.Join(s.dir, "agent-"+name+".log"), Append: true,
		Argv: []string{s.opts.Binaries.Agent, "run", "-config", conf}}
	p, err := s.launcher.Start(a.run)
	if err != nil {
		return nil, fmt.Errorf("spiretest: %w", err)
	}
	s.mu.Lock()
	a.proc = p
	s.agents = append(s.agents, a)
	s.mu.Unlock()
	if err := s.waitHealthy(ctx, p, s.opts.Binaries.Agent, "healthcheck", "-socketPath", a.WorkloadSocket); err != nil {
		return nil, err
	}
	s.opts.Log.Info("SPIRE agent ready", "name", name, "id", id.String(), "took", time.Since(start).Round(time.Millisecond))
	return a, nil
}

// KillServer kills the SPIRE server (SIGKILL, as in a crash) and waits
// until it is gone; its data stays, and the agents keep running. Restart
// starts it again.
func (s *Server) KillServer() error {
	s.mu.Lock()
	p := s.proc
	s.mu.Unlock()
	if p == nil {
		return errors.New("spiretest: the server is stopped")
	}
	return wrap(p.Kill())
}

// RestartServer starts the SPIRE server again on its data (its entries,
// attested agents and CA keys) after KillServer, and waits until it is
// healthy.
func (s *Server) RestartServer(ctx context.Context) error {
	start := time.Now()
	p, err := s.restart(s.run, &s.proc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.ReadyTimeout)
	defer cancel()
	if err := s.waitHealthy(ctx, p, s.opts.Binaries.Server, "healthcheck", "-socketPath", s.socket); err != nil {
		return err
	}
	s.opts.Log.Info("SPIRE server ready again", "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// KillAgent kills a (SIGKILL) and waits until it is gone; its data (its
// own SVID and key) stays. RestartAgent starts it again.
func (s *Server) KillAgent(a *Agent) error {
	s.mu.Lock()
	p := a.proc
	s.mu.Unlock()
	if p == nil {
		return fmt.Errorf("spiretest: agent %s is stopped", a.Name)
	}
	return wrap(p.Kill())
}

// RestartAgent starts a again after KillAgent and waits until its
// Workload API answers. It comes back with the SVID it had (a join token
// attests only once), so the server must be running for it to renew.
func (s *Server) RestartAgent(ctx context.Context, a *Agent) error {
	start := time.Now()
	p, err := s.restart(a.run, &a.proc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.ReadyTimeout)
	defer cancel()
	if err := s.waitHealthy(ctx, p, s.opts.Binaries.Agent, "healthcheck", "-socketPath", a.WorkloadSocket); err != nil {
		return err
	}
	s.opts.Log.Info("SPIRE agent ready again", "name", a.Name, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// restart starts c in place of *pp, which must have exited.
func (s *Server) restart(c proc.Command, pp **proc.Process) (*proc.Process, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.launcher == nil:
		return nil, errors.New("spiretest: the server is stopped")
	case *pp == nil:
		return nil, fmt.Errorf("spiretest: %s never started", c.Name)
	case (*pp).Running():
		return nil, fmt.Errorf("spiretest: %s still runs (pid %d)", c.Name, (*pp).Pid())
	}
	p, err := s.launcher.Start(c)
	if err != nil {
		return nil, fmt.Errorf("spiretest: %w", err)
	}
	*pp = p
	return p, nil
}

// CreateEntry registers e with the server. Agents learn of it at their
// next sync with the server (within about 5 s).
func (s *Server) CreateEntry(ctx context.Context, e Entry) error {
	args := []string{"entry", "create", "-parentID", e.Parent.String(), "-spiffeID", e.ID.String()}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	if e.X509SVIDTTL > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL.Seconds())))
	}
	_, err := s.cli(ctx, args...)
	return err
}

// cli runs a spire-server command against the server's API socket and
// returns its standard output.
func (s *Server) cli(ctx context.Context, args ...string) ([]byte, error) {
	args = append(args, "-socketPath", s.socket)
	cmd := exec.CommandContext(ctx, s.opts.Binaries.Server, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("spiretest: spire-server %s: %w: %s%s", strings.Join(args, " "), err, bytes.TrimSpace(out), bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// waitHealthy runs a health check command until it succeeds, p exits or
// ctx ends.
func (s *Server) waitHealthy(ctx context.Context, p *proc.Process, bin string, args ...string) error {
	var last []byte
	for {
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		if err == nil {
			return nil
		}
		last = out
		select {
		case <-p.Exited():
			return fmt.Errorf("spiretest: %w", p.ExitError())
		case <-ctx.Done():
			return fmt.Errorf("spiretest: %s not healthy: %w (last check: %s); the end of its log %s:\n%s",
				p.Name, ctx.Err(), bytes.TrimSpace(last), p.LogPath, p.LogTail(30))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Logs returns the end of every process's log, for a failed test.
func (s *Server) Logs(lines int) string {
	var b strings.Builder
	s.mu.Lock()
	procs := []*proc.Process{s.proc}
	for _, a := range s.agents {
		procs = append(procs, a.proc)
	}
	s.mu.Unlock()
	for _, p := range procs {
		if p != nil {
			fmt.Fprintf(&b, "--- %s (%s) ---\n%s\n", p.Name, p.LogPath, p.LogTail(lines))
		}
	}
	return b.String()
}

// Stop kills the agents and the server and removes the run folder. It is
// safe to call more than once.
func (s *Server) Stop() error {
	s.mu.Lock()
	var procs []*proc.Process
	for _, a := range s.agents {
		procs = append(procs, a.proc)
	}
	if s.proc != nil {
		procs = append(procs, s.proc)
	}
	l, dir := s.launcher, s.dir
	s.agents, s.proc, s.launcher, s.dir = nil, nil, nil, ""
	s.mu.Unlock()
	var errs []error
	for _, p := range procs {
		errs = append(errs, wrap(p.Kill()))
	}
	if l != nil {
		l.Close()
	}
	if dir != "" {
		errs = append(errs, os.RemoveAll(dir))
	}
	return errors.Join(errs...)
}

// wrap says that err comes from spiretest; nil stays nil.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("spiretest: %w", err)
}
