// Package meshtest runs a mesh on the testbed: a cluster of network
// namespaces (internal/testbed), a CA, the cluster file, and one real
// `mantlet agent` process per node, started inside the node's namespace.
// The end-to-end tests, `mantlet demo` and `mantlet bench` build on it.
//
// The mesh reads the agents' state the way an operator does: through each
// agent's admin API on its unix socket (Status, Flows, Admin) and its
// Prometheus metrics (Metrics), never from their logs. Logs and Records
// are there for tests of what an agent logs, and to explain a failure.
//
// A Mesh is started with Start and must be closed with Close, which stops
// the agents (SIGTERM, then SIGKILL), removes each node's pinned data path
// (`mantlet agent --cleanup`) and removes the testbed, also after a failure.
// Agents die with the process that started them (parent-death signal), so a
// killed test leaves at most namespaces and pins, which `mantlet testbed
// down` and `mantlet agent --cleanup` remove.
package meshtest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/testbed"
	"github.com/mantlet/mantlet/telemetry"
)

// Annotations the agent reads (see docs/standalone.md).
const (
	// MeshAnnotation opts a namespace in ("enabled") or a pod out
	// ("disabled").
	MeshAnnotation = "mantlet.io/mesh"
	// MTLSAnnotation sets a namespace's mTLS mode: "STRICT" or "PERMISSIVE".
	MTLSAnnotation = "mantlet.io/mtls"
)

// Ports of the agent, in each node's namespace.
const (
	MetricsPort = 15020
	HBONEPort   = 15008
)

// requestTimeout bounds one request to an agent (a frozen agent accepts
// connections and never answers).
const requestTimeout = 5 * time.Second

// Defaults of Options.
const (
	DefaultLogLimit     = 4 << 20
	DefaultReadyTimeout = 30 * time.Second
	DefaultStopTimeout  = 15 * time.Second
)

// Options configure Start. Only Binary is required.
type Options struct {
	// Binary is the path of the mantlet executable that runs the agents:
	// tests build it (see Build), the demo passes os.Executable().
	Binary string
	// BinaryArgs go before "agent" on every command line meshtest runs:
	// with Env, they let a test binary stand in for mantlet (for example
	// os.Args[0] with "-test.run=^TestHelperProcess$", "--").
	BinaryArgs []string
	// Env is added to the environment of the agents and of the clean-up.
	Env []string
	// MTLSMode is the agents' --mtls-mode, the mode of namespaces without
	// the mantlet.io/mtls annotation: "STRICT" or "PERMISSIVE" (default:
	// the agent's default, PERMISSIVE).
	MTLSMode string
	// AgentArgs are added to every agent's command line after the flags
	// meshtest sets, so they can override them (but the mesh reads the
	// agents through their admin sockets and metrics: leave those on).
	AgentArgs []string
	// IssuerArgs, when set, gives node's agent its issuer flags in place
	// of --ca-dir CADir (for example --issuer cluster-ca with that node's
	// token, or --issuer spire with that node's SPIRE agent's sockets). It
	// is called at every start of the agent.
	IssuerArgs func(node string) []string
	// TrustDomain of the CA (default identity.DefaultTrustDomain).
	TrustDomain string
	// Prefix names the testbed (default: testbed's random prefix).
	Prefix string
	// Dir holds the CA (Dir/ca). Default: a temporary directory that Close
	// removes; a given Dir is left in place.
	Dir string
	// LogLimit bounds the log kept per agent run, in bytes (default
	// DefaultLogLimit): the first quarter and the most recent lines.
	LogLimit int
	// ReadyTimeout bounds how long Start, StartAgent and the annotation
	// setters wait for agents to settle (default DefaultReadyTimeout).
	ReadyTimeout time.Duration
	// StopTimeout is how long StopAgent and Close wait after SIGTERM before
	// SIGKILL (default DefaultStopTimeout).
	StopTimeout time.Duration
	// Logger logs what the mesh does (default: discard).
	Logger *slog.Logger
	// Stderr, when set, also receives every agent's output as it comes
	// (for example os.Stderr in the demo's --keep mode).
	Stderr io.Writer
	// Cluster, when set, runs once the testbed and the CA exist and before
	// any agent starts. It returns the flags that tell the agents where
	// the cluster is (for example --kubeconfig FILE of a Kubernetes API
	// server it filled), in place of --config and the testbed's cluster
	// file; the annotation setters, which edit that file, then do nothing
	// the agents see.
	Cluster func(ctx context.Context, m *Mesh) (sourceArgs []string, err error)
}

// Mesh is a running mesh. Its methods are safe for concurrent use.
type Mesh struct {
	// TB is the testbed the mesh runs on.
	TB *testbed.Testbed
	// CA is the mesh's certificate authority, loaded from CADir.
	CA *ca.CA
	// CADir is the CA directory the agents use (--ca-dir).
	CADir string
	// ConfigPath is the cluster file the agents watch (--config).
	ConfigPath string

	opts       Options
	sourceArgs []string // --config ConfigPath, or Options.Cluster's
	log        *slog.Logger
	tmpDir     string // removed by Close; "" when Options.Dir was given
	td         spiffeid.TrustDomain
	fileMu     sync.Mutex // serialises writes of the cluster file
	mu         sync.Mutex
	agents     map[string]*agentProc
	history    map[string]*logBuffer    // logs of earlier runs, per node
	admins     map[string]*admin.Client // per node, made by Admin
	closed     bool
}

// agentProc is one run of `mantlet agent`.
type agentProc struct {
	node string
	cmd  *exec.Cmd
	logs *logBuffer
	done chan struct{} // closed when the process exited; then err is set
	err  error
}

func (p *agentProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (o Options) withDefaults() Options {
	if o.TrustDomain == "" {
		o.TrustDomain = identity.DefaultTrustDomain.Name()
	}
	if o.LogLimit <= 0 {
		o.LogLimit = DefaultLogLimit
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = DefaultReadyTimeout
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = DefaultStopTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Start builds the testbed described by spec, creates a CA, writes the
// cluster file, starts one agent per node and waits until every agent is
// ready with all its meshed pods enrolled. If anything fails, or ctx is
// cancelled, it removes everything it made and returns the error.
func Start(ctx context.Context, spec testbed.Spec, opts Options) (m *Mesh, err error) {
	opts = opts.withDefaults()
	if opts.Binary == "" {
		return nil, errors.New("meshtest: Options.Binary is required")
	}
	if _, err := os.Stat(opts.Binary); err != nil {
		return nil, fmt.Errorf("meshtest: agent binary: %w", err)
	}
	td, err := spiffeid.TrustDomainFromString(opts.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("meshtest: trust domain %q: %w", opts.TrustDomain, err)
	}
	m = &Mesh{opts: opts, log: opts.Logger, td: td, agents: map[string]*agentProc{}, history: map[string]*logBuffer{}, admins: map[string]*admin.Client{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, m.Close())
			m = nil
		}
	}()
	dir := opts.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "mantlet-mesh-*"); err != nil {
			return m, fmt.Errorf("meshtest: %w", err)
		}
		m.tmpDir = dir
	}
	tbOpts := []testbed.Option{testbed.WithLogger(opts.Logger)}
	if opts.Prefix != "" {
		tbOpts = append(tbOpts, testbed.WithPrefix(opts.Prefix))
	}
	if m.TB, err = testbed.New(ctx, spec, tbOpts...); err != nil {
		return m, fmt.Errorf("meshtest: %w", err)
	}
	m.CADir = filepath.Join(dir, "ca")
	if m.CA, err = ca.Init(m.CADir, td, ca.Options{}); err != nil {
		return m, fmt.Errorf("meshtest: %w", err)
	}
	if m.ConfigPath, err = m.TB.WriteManifest(); err != nil {
		return m, fmt.Errorf("meshtest: %w", err)
	}
	m.sourceArgs = []string{"--config", m.ConfigPath}
	if opts.Cluster != nil {
		if m.sourceArgs, err = opts.Cluster(ctx, m); err != nil {
			return m, fmt.Errorf("meshtest: cluster: %w", err)
		}
	}
	for _, n := range m.TB.Nodes() {
		if err := m.startProc(n); err != nil {
			return m, err
		}
	}
	return m, m.WaitSettled(ctx)
}

// PinDir returns the pin directory of node's agent:
// /sys/fs/bpf/mantlet/<prefix>-<node>.
func (m *Mesh) PinDir(node string) string {
	return filepath.Join(bpf.DefaultPinRoot, m.TB.Prefix()+"-"+strings.ReplaceAll(node, ".", "-"))
}

// Node returns the testbed node called name, or nil.
func (m *Mesh) Node(name string) *testbed.Node { return m.TB.Node(name) }

// Pod returns the testbed pod called name, or nil.
func (m *Mesh) Pod(name string) *testbed.Pod { return m.TB.Pod(name) }

// TrustDomain returns the mesh's trust domain.
func (m *Mesh) TrustDomain() spiffeid.TrustDomain { return m.td }

// ID returns the SPIFFE ID of pod: spiffe://<td>/ns/<ns>/sa/<sa>.
func (m *Mesh) ID(pod string) (spiffeid.ID, error) {
	p := m.TB.Pod(pod)
	if p == nil {
		return spiffeid.ID{}, fmt.Errorf("meshtest: no pod %q", pod)
	}
	return identity.WorkloadID(m.td, p.Namespace, p.ServiceAccount)
}

// agentArgs returns the command line of node's agent.
func (m *Mesh) agentArgs(node string) []string {
	args := append(slices.Clone(m.opts.BinaryArgs), "agent", "--node-name", node)
	args = append(args, m.sourceArgs...)
	if m.opts.IssuerArgs != nil {
		args = append(args, m.opts.IssuerArgs(node)...)
	} else {
		args = append(args, "--ca-dir", m.CADir)
	}
	args = append(args, "--pin-dir", m.PinDir(node), "--config-poll", "200ms", "--drain-timeout", "2s",
		"--log-format", "json", "--log-level", "debug")
	if m.opts.MTLSMode != "" {
		args = append(args, "--mtls-mode", m.opts.MTLSMode)
	}
	return append(args, m.opts.AgentArgs...)
}

// startProc starts node's agent without waiting for it.
func (m *Mesh) startProc(n *testbed.Node) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("meshtest: mesh is closed")
	}
	if p := m.agents[n.Name]; p != nil && !p.exited() {
		return fmt.Errorf("meshtest: agent of %s is already running", n.Name)
	}
	m.retireLocked(n.Name)
	// The process outlives the call: it must not be tied to a request's
	// context. Close stops it.
	cmd := n.Command(context.Background(), m.opts.Binary, m.agentArgs(n.Name)...)
	p := &agentProc{node: n.Name, cmd: cmd, logs: newLogBuffer(m.opts.LogLimit), done: make(chan struct{})}
	var out io.Writer = p.logs
	if m.opts.Stderr != nil {
		out = io.MultiWriter(p.logs, &prefixWriter{w: m.opts.Stderr, prefix: []byte("[" + n.Name + "] ")})
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = sysProcAttr()
	if len(m.opts.Env) > 0 {
		cmd.Env = append(os.Environ(), m.opts.Env...)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("meshtest: start agent of %s: %w", n.Name, err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	m.agents[n.Name] = p
	m.log.Info("agent started", "node", n.Name, "pid", cmd.Process.Pid)
	return nil
}

// retireLocked moves the logs of node's finished run into its history.
func (m *Mesh) retireLocked(node string) {
	p := m.agents[node]
	if p == nil {
		return
	}
	h := m.history[node]
	if h == nil {
		h = newLogBuffer(m.opts.LogLimit)
		m.history[node] = h
	}
	fmt.Fprintf(h, "--- meshtest: agent run ended (%v) ---\n", p.err)
	_, _ = h.Write([]byte(p.logs.String()))
	delete(m.agents, node)
}

func (m *Mesh) proc(node string) (*agentProc, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.agents[node]; p != nil {
		return p, nil
	}
	return nil, fmt.Errorf("meshtest: no agent was started on %q", node)
}

// StartAgent starts node's agent (after StopAgent or KillAgent) and waits
// until it is ready with all its meshed pods enrolled.
func (m *Mesh) StartAgent(ctx context.Context, node string) error {
	n := m.TB.Node(node)
	if n == nil {
		return fmt.Errorf("meshtest: no node %q", node)
	}
	if err := m.startProc(n); err != nil {
		return err
	}
	return m.waitNode(ctx, node)
}

// StopAgent stops node's agent the way a rolling update does: SIGTERM,
// then SIGKILL after Options.StopTimeout. It returns the agent's exit
// error (nil for a clean exit).
func (m *Mesh) StopAgent(ctx context.Context, node string) error {
	p, err := m.proc(node)
	if err != nil {
		return err
	}
	return m.stop(ctx, p)
}

func (m *Mesh) stop(ctx context.Context, p *agentProc) error {
	if p.exited() {
		return p.err
	}
	_ = p.cmd.Process.Signal(sigterm)
	thaw(p) // a frozen agent acts on SIGTERM once continued
	t := time.NewTimer(m.opts.StopTimeout)
	defer t.Stop()
	select {
	case <-p.done:
		m.log.Info("agent stopped", "node", p.node, "exit", p.err)
		return p.err
	case <-t.C:
	case <-ctx.Done():
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return fmt.Errorf("meshtest: agent of %s did not exit within %v of SIGTERM; killed", p.node, m.opts.StopTimeout)
}

// KillAgent kills node's agent with SIGKILL (a crash: no drain, no
// clean-up) and waits until it is gone.
func (m *Mesh) KillAgent(node string) error {
	p, err := m.proc(node)
	if err != nil {
		return err
	}
	if !p.exited() {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
	m.log.Info("agent killed", "node", node)
	return nil
}

// Running reports whether node's agent process is alive.
func (m *Mesh) Running(node string) bool {
	p, err := m.proc(node)
	return err == nil && !p.exited()
}

// ExpectedEnrolled returns how many pods of node are meshed according to
// the cluster file as it is now: pods of a namespace annotated
// mantlet.io/mesh=enabled that are not annotated mantlet.io/mesh=disabled.
func (m *Mesh) ExpectedEnrolled(node string) int {
	spec := m.TB.Spec()
	n := 0
	for _, ns := range spec.Nodes {
		if ns.Name != node {
			continue
		}
		for _, p := range ns.Pods {
			namespace := p.Namespace
			if namespace == "" {
				namespace = "default"
			}
			if spec.Namespaces[namespace][MeshAnnotation] == "enabled" && p.Annotations[MeshAnnotation] != "disabled" {
				n++
			}
		}
	}
	return n
}

// CheckSettled returns nil when st is the status of an agent that is
// ready with exactly enrolled local pods enrolled, none pending, and a
// veth attached for each; otherwise an error that says what st shows.
func CheckSettled(st admin.Status, enrolled int) error {
	if st.Ready && st.Snapshot.Enrolled == enrolled && st.Snapshot.Pending == 0 && st.Datapath.Pods == enrolled {
		return nil
	}
	return fmt.Errorf("ready %v (%s), %d local pods enrolled, %d pending, %d veths attached; want ready with %d enrolled",
		st.Ready, st.Reason, st.Snapshot.Enrolled, st.Snapshot.Pending, st.Datapath.Pods, enrolled)
}

// WaitSettled waits until every running agent is ready and has exactly
// the meshed pods of the cluster file enrolled (see CheckSettled).
func (m *Mesh) WaitSettled(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(m.TB.Nodes()))
	for i, n := range m.TB.Nodes() {
		if !m.Running(n.Name) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.waitNode(ctx, n.Name)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitNode waits until node's agent is ready with the expected pods.
func (m *Mesh) waitNode(ctx context.Context, node string) error {
	p, err := m.proc(node)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, m.opts.ReadyTimeout)
	defer cancel()
	var last error // why it is not settled, as of the last answer
	for {
		st, err := m.Status(ctx, node)
		if err == nil {
			err = CheckSettled(st, m.ExpectedEnrolled(node))
		}
		switch {
		case err == nil:
			return nil
		case ctx.Err() == nil:
			last = err
		}
		if p.exited() {
			return fmt.Errorf("meshtest: agent of %s exited (%v) before it was ready; its output:\n%s", node, p.err, excerpt(p.logs.String(), 10, 20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("meshtest: agent of %s not settled (%v): %w", node, last, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// AdminSocket returns the unix socket of node's admin API; the agent names
// it after its pin directory: /run/mantlet/<prefix>-<node>/admin.sock.
func (m *Mesh) AdminSocket(node string) string {
	return admin.SocketPath(filepath.Base(m.PinDir(node)))
}

// Admin returns a client of node's admin API through its unix socket,
// which a process in any network namespace reaches. The client lasts as
// long as the mesh and follows the node's agent across restarts.
func (m *Mesh) Admin(node string) *admin.Client {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.admins[node]
	if c == nil {
		c, _ = admin.NewClient(m.AdminSocket(node)) // a path is always a valid address
		m.admins[node] = c
	}
	return c
}

// Status returns node's agent's /v1/status.
func (m *Mesh) Status(ctx context.Context, node string) (admin.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	st, err := m.Admin(node).Status(ctx)
	if err != nil {
		return st, fmt.Errorf("meshtest: status of %s: %w", node, err)
	}
	return st, nil
}

// get fetches http://127.0.0.1:<port><path> inside node's namespace (the
// agent's metrics endpoint) and returns the status and the body, trimmed.
func (m *Mesh) get(ctx context.Context, node string, port int, path string) (int, string, error) {
	n := m.TB.Node(node)
	if n == nil {
		return 0, "", fmt.Errorf("meshtest: no node %q", node)
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return n.Dial(ctx, network, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	if err != nil {
		return 0, "", fmt.Errorf("meshtest: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("meshtest: get %s on %s: %w", path, node, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp.StatusCode, "", fmt.Errorf("meshtest: get %s on %s: %w", path, node, err)
	}
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// SetNamespaceAnnotations replaces the annotations of a Kubernetes
// namespace in the cluster file (nil removes them all), rewrites the file
// and waits until the running agents have applied it.
func (m *Mesh) SetNamespaceAnnotations(ctx context.Context, namespace string, annotations map[string]string) error {
	m.fileMu.Lock()
	m.TB.SetNamespaceAnnotations(namespace, annotations)
	_, err := m.TB.WriteManifest()
	m.fileMu.Unlock()
	if err != nil {
		return fmt.Errorf("meshtest: %w", err)
	}
	return m.WaitSettled(ctx)
}

// SetPodAnnotations replaces the annotations of a pod in the cluster file,
// rewrites the file and waits until the running agents have applied it.
func (m *Mesh) SetPodAnnotations(ctx context.Context, pod string, annotations map[string]string) error {
	m.fileMu.Lock()
	ok := m.TB.SetPodAnnotations(pod, annotations)
	var err error
	if ok {
		_, err = m.TB.WriteManifest()
	}
	m.fileMu.Unlock()
	if !ok {
		return fmt.Errorf("meshtest: no pod %q", pod)
	}
	if err != nil {
		return fmt.Errorf("meshtest: %w", err)
	}
	return m.WaitSettled(ctx)
}

// Counters reads node's data path counters from its pins (they survive
// agent restarts and keep counting while no agent runs).
func (m *Mesh) Counters(node string) (bpf.Counters, error) {
	return bpf.ReadPinnedCounters(m.PinDir(node))
}

// Logs returns the output of node's current (or last) agent run: JSON
// lines, bounded by Options.LogLimit.
func (m *Mesh) Logs(node string) string {
	p, err := m.proc(node)
	if err != nil {
		return ""
	}
	return p.logs.String()
}

// AllLogs returns the output of every agent run of node, earlier runs
// first, each bounded by Options.LogLimit.
func (m *Mesh) AllLogs(node string) string {
	m.mu.Lock()
	h, p := m.history[node], m.agents[node]
	m.mu.Unlock()
	var b strings.Builder
	if h != nil {
		b.WriteString(h.String())
	}
	if p != nil {
		b.WriteString(p.logs.String())
	}
	return b.String()
}

// Records returns the JSON log records of node's current agent run
// (lines that are not JSON are skipped), for tests of what the agent
// logs; read its state with Status, Flows and Metrics instead.
func (m *Mesh) Records(node string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(m.Logs(node), "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var r map[string]any
		if json.Unmarshal([]byte(line), &r) == nil {
			out = append(out, r)
		}
	}
	return out
}

// Flow is one connection the ztunnel of a node handled, from the close
// event its agent recorded (/v1/flows).
type Flow struct {
	// Node is the node whose ztunnel handled the flow.
	Node string
	// Direction is "outbound", "inbound" or "inbound_plaintext"; Path is
	// "hbone", "local" or "passthrough".
	Direction, Path string
	// Src is the client's address, Dst the destination pod's.
	Src, Dst netip.AddrPort
	// SrcID and DstID are the identities on both ends ("" when none).
	SrcID, DstID string
	// Sent and Received count bytes from and to the client.
	Sent, Received int64
	// Flag is the response flag: "-" for a flow that went through,
	// otherwise why it was refused or failed; Error the underlying error.
	Flag, Error string
}

// Flows returns the flows node's ztunnel finished in the current agent
// run, accepted and refused, oldest first: the close events its agent
// keeps for /v1/flows (the newest 4096 unless --flow-log-size says
// otherwise).
func (m *Mesh) Flows(ctx context.Context, node string) ([]Flow, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	evs, err := m.Admin(node).Flows(ctx, telemetry.FlowFilter{Event: events.Close}, 0)
	if err != nil {
		return nil, fmt.Errorf("meshtest: flows of %s: %w", node, err)
	}
	out := make([]Flow, len(evs))
	for i, ev := range evs {
		out[i] = Flow{Node: node, Direction: ev.Direction, Path: ev.Path, Src: ev.Src.Addr, Dst: ev.Dst.Addr,
			SrcID: ev.Src.Identity, DstID: ev.Dst.Identity, Sent: ev.BytesSent, Received: ev.BytesReceived,
			Flag: ev.ResponseFlag, Error: ev.Error}
	}
	return out, nil
}

// WaitFlow waits until node's ztunnel finished a flow that match accepts
// and returns it.
func (m *Mesh) WaitFlow(ctx context.Context, node string, match func(Flow) bool) (Flow, error) {
	seen := 0
	var last error // of the last request, if it failed
	for {
		flows, err := m.Flows(ctx, node)
		switch {
		case err == nil:
			for _, f := range flows {
				if match(f) {
					return f, nil
				}
			}
			seen, last = len(flows), nil
		case ctx.Err() == nil:
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return Flow{}, fmt.Errorf("meshtest: no matching flow on %s (%v): %w", node, last, ctx.Err())
			}
			return Flow{}, fmt.Errorf("meshtest: no matching flow among the %d that %s finished: %w", seen, node, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// IssueSVID issues an X509-SVID for id from the mesh's CA, with a fresh
// key made here, as `mantlet ca issue` would: for tests that talk to the
// HBONE listeners directly. It lives an hour.
func (m *Mesh) IssueSVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("meshtest: key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("meshtest: certificate request: %w", err)
	}
	chain, err := m.CA.SignCSR(ctx, csr, id, time.Hour)
	if err != nil {
		return nil, fmt.Errorf("meshtest: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// Bundle returns the mesh's trust bundle.
func (m *Mesh) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(m.td, []*x509.Certificate{m.CA.Root()})
}

// Close stops every agent (SIGTERM, then SIGKILL), removes each node's
// pinned data path with `mantlet agent --cleanup`, removes the testbed and
// the temporary directory. It is idempotent and returns every error met.
func (m *Mesh) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for _, c := range m.admins {
		c.Close()
	}
	procs := make([]*agentProc, 0, len(m.agents))
	for _, p := range m.agents {
		if !p.exited() { // an agent that exited earlier was reported then
			procs = append(procs, p)
		}
	}
	m.mu.Unlock()

	var errs []error
	var wg sync.WaitGroup
	stopErrs := make([]error, len(procs))
	for i, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.stop(context.Background(), p); err != nil && !isSignalExit(err) {
				stopErrs[i] = fmt.Errorf("meshtest: agent of %s: %w", p.node, err)
			}
		}()
	}
	wg.Wait()
	errs = append(errs, stopErrs...)
	if m.TB != nil {
		for _, n := range m.TB.Nodes() {
			if _, err := os.Stat(m.PinDir(n.Name)); err != nil {
				continue // never pinned, or already removed
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			args := append(slices.Clone(m.opts.BinaryArgs), "agent", "--cleanup", "--node-name", n.Name, "--pin-dir", m.PinDir(n.Name))
			cmd := n.Command(ctx, m.opts.Binary, args...)
			if len(m.opts.Env) > 0 {
				cmd.Env = append(os.Environ(), m.opts.Env...)
			}
			out, err := cmd.CombinedOutput()
			cancel()
			if err != nil {
				errs = append(errs, fmt.Errorf("meshtest: clean-up of %s: %w: %s", n.Name, err, bytes.TrimSpace(out)))
			}
		}
		if err := m.TB.Close(); err != nil {
			errs = append(errs, fmt.Errorf("meshtest: %w", err))
		}
	}
	if m.tmpDir != "" {
		if err := os.RemoveAll(m.tmpDir); err != nil {
			errs = append(errs, fmt.Errorf("meshtest: %w", err))
		}
	}
	m.log.Info("mesh closed")
	return errors.Join(errs...)
}

// isSignalExit reports whether err says a process died of a signal (an
// agent that KillAgent killed, or one stopped by Ctrl-C).
func isSignalExit(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && !ee.Exited()
}

// BinaryEnv names an environment variable that tests may read for the
// path of a mantlet binary to use instead of building one with Build.
const BinaryEnv = "MANTLET_TEST_BINARY"

// Build compiles the mantlet command into dir, with the build tags given
// (spire: the SPIRE issuer), and returns the binary's path. It must run inside the mantlet module with the go command in PATH
// (tests under go test do).
func Build(ctx context.Context, dir string, tags ...string) (string, error) {
	out := filepath.Join(dir, "mantlet")
	args := []string{"build", "-o", out}
	if len(tags) > 0 {
		out += "-" + strings.Join(tags, "-")
		args = []string{"build", "-tags", strings.Join(tags, ","), "-o", out}
	}
	// go test puts the toolchain's bin directory first in PATH. Static, as
	// the image builds it (and as make build does): the tests run what
	// ships.
	cmd := exec.CommandContext(ctx, "go", append(args, "github.com/mantlet/mantlet/cmd/mantlet")...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("meshtest: build mantlet: %w\n%s", err, b)
	}
	return out, nil
}

// excerpt returns the first head and the last tail lines of s.
func excerpt(s string, head, tail int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) <= head+tail {
		return strings.Join(lines, "\n")
	}
	return strings.Join(lines[:head], "\n") + fmt.Sprintf("\n[... %d lines ...]\n", len(lines)-head-tail) +
		strings.Join(lines[len(lines)-tail:], "\n")
}

// prefixWriter writes each line with a prefix.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix []byte
	mid    bool // in the middle of a line
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []byte
	for _, c := range b {
		if !p.mid {
			out = append(out, p.prefix...)
			p.mid = true
		}
		out = append(out, c)
		if c == '\n' {
			p.mid = false
		}
	}
	if _, err := p.w.Write(out); err != nil {
		return 0, err
	}
	return len(b), nil
}

// logBuffer keeps a process's output within a bound: the first quarter of
// the limit (start-up) and the most recent lines.
type logBuffer struct {
	mu      sync.Mutex
	limit   int
	head    []byte
	tail    []byte
	dropped int
}

func newLogBuffer(limit int) *logBuffer { return &logBuffer{limit: limit} }

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(p)
	if room := l.limit/4 - len(l.head); room > 0 && len(l.tail) == 0 {
		k := min(room, len(p))
		l.head = append(l.head, p[:k]...)
		p = p[k:]
	}
	l.tail = append(l.tail, p...)
	if max := l.limit - l.limit/4; len(l.tail) > max {
		// Keep the newest half of the tail's room, from a line start.
		cut := len(l.tail) - max/2
		if i := bytes.IndexByte(l.tail[cut:], '\n'); i >= 0 {
			cut += i + 1
		}
		l.dropped += cut
		l.tail = append(l.tail[:0:0], l.tail[cut:]...)
	}
	return n, nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.dropped == 0 {
		return string(l.head) + string(l.tail)
	}
	return fmt.Sprintf("%s\n--- meshtest: %d bytes of log dropped ---\n%s", l.head, l.dropped, l.tail)
}

// BinaryOrBuild returns $MANTLET_TEST_BINARY (BinaryEnv) if set, else
// mantlet built into dir: the binary tests run agents and commands with.
func BinaryOrBuild(ctx context.Context, dir string) (string, error) {
	if b := os.Getenv(BinaryEnv); b != "" {
		return b, nil
	}
	return Build(ctx, dir)
}

// SyncBuffer is a bytes.Buffer that a running command writes while a test
// reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
