package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/enforce"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/telemetry"
	"github.com/mantlet/mantlet/ztunnel"
)

// Datapath is what the API reads of the eBPF data path; *bpf.Datapath
// implements it.
type Datapath interface {
	Status() bpf.Status
	Counters() (bpf.Counters, error)
	Repairs() map[bpf.Fault]uint64
}

// PolicyEngine is what the API asks about policy; *policy.Engine
// implements it.
type PolicyEngine interface {
	Decide(policy.Input) policy.Decision
	Generation() uint64
	MTLSMode(*workload.Workload) v1alpha1.MTLSMode
}

// Config gives the server its sources. Node and Snapshot are required;
// every other source may be nil, and the endpoints that need it then say
// so (404 for the resource, or an empty section in /v1/status).
type Config struct {
	// Node is this node's name.
	Node string
	// TrustDomain names identities (identity.DefaultTrustDomain when zero).
	TrustDomain spiffeid.TrustDomain
	// Version is the build's version, shown in /v1/status.
	Version string
	// Snapshot returns the workload snapshot in force.
	Snapshot func() *workload.Snapshot
	// Ready is the readiness probe's answer (agent.Agent.Ready).
	Ready func() (bool, string)
	// Pods reports the agent's local pods (agent.Agent.Pods).
	Pods func() []agent.PodStatus
	// Datapath is the eBPF data path.
	Datapath Datapath
	// Source reports how the source of the desired state fares
	// (file.Watcher.ReloadStatus).
	Source func() source.Status
	// Certificates lists the node's SVIDs (identity.Manager.Certificates);
	// Bundles its trust bundles (identity.Manager.Bundles).
	Certificates func() []identity.CertInfo
	Bundles      func() []identity.BundleInfo
	// Policy is the live policy engine; Policies the set in force, as
	// written.
	Policy   PolicyEngine
	Policies func() []*v1alpha1.MeshPolicy
	// Flows holds the recent flow events; OpenFlows counts open flows.
	Flows     *telemetry.FlowLog
	OpenFlows func() int
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger receives serving errors; nil discards.
	Logger *slog.Logger
}

// Server is the admin API.
type Server struct {
	cfg Config
	mux *http.ServeMux
}

// NewServer returns the API over cfg.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Node == "" || cfg.Snapshot == nil {
		return nil, errors.New("admin: config: Node and Snapshot are required")
	}
	if cfg.TrustDomain.IsZero() {
		cfg.TrustDomain = identity.DefaultTrustDomain
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux()}
	s.mux.HandleFunc("GET /v1/status", s.status)
	s.mux.HandleFunc("GET /v1/workloads", s.workloads)
	s.mux.HandleFunc("GET /v1/services", s.services)
	s.mux.HandleFunc("GET /v1/policies", s.policies)
	s.mux.HandleFunc("GET /v1/certs", s.certs)
	s.mux.HandleFunc("GET /v1/datapath", s.datapath)
	s.mux.HandleFunc("GET /v1/flows", s.flows)
	s.mux.HandleFunc("GET /v1/policy/check", s.check)
	s.handleProfiles()
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint %s %s; see /v1/status, /v1/workloads, /v1/services, /v1/policies, /v1/certs, /v1/datapath, /v1/flows, /v1/policy/check, /debug/pprof/", r.Method, r.URL.Path))
	})
	return s, nil
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler { return s.mux }

// Serve serves the API on each listener until ctx is done, then closes
// them; streams (flows?follow=1) end with ctx.
func (s *Server) Serve(ctx context.Context, lns ...net.Listener) error {
	srv := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 5 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ErrorLog:          slog.NewLogLogger(s.cfg.Logger.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("admin: serve %s: %w", ln.Addr(), err)
				return
			}
			errc <- nil
		}()
	}
	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
	}
	srv.Close()
	return first
}

// ListenUnix listens on a unix socket at path, creating its directory
// (0755) and making the socket 0660. A stale socket left by a previous
// agent is replaced; a live one (another agent answers) is an error.
func ListenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin: socket %s: %w", path, err)
	}
	if _, err := removeStale(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin: socket %s: %w", path, err)
	}
	return ln, nil
}

// removeStale removes the socket at path if no process serves it, and
// reports whether there was one. A live socket, or a file that is not a
// socket, is an error.
func removeStale(path string) (bool, error) {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("admin: socket %s: %w", path, err)
	case fi.Mode().Type() != os.ModeSocket:
		return false, fmt.Errorf("admin: socket %s: a file that is not a socket is in the way", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return false, fmt.Errorf("admin: socket %s: another process serves it (another agent for this node?)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("admin: remove the stale socket %s: %w", path, err)
	}
	return true, nil
}

// RemoveStaleSocket removes the socket at path that an agent which did
// not shut down (a crash, SIGKILL) left behind, and its folder if that is
// then empty. It reports whether there was such a socket; a socket that a
// process still serves is left alone, with an error.
func RemoveStaleSocket(path string) (bool, error) {
	removed, err := removeStale(path)
	if removed {
		os.Remove(filepath.Dir(path)) // only when empty
	}
	return removed, err
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(Error{Error: msg})
}

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, s.Status())
}

// Status computes /v1/status.
func (s *Server) Status() Status {
	st := Status{Node: s.cfg.Node, Version: s.cfg.Version, Ready: true, Reason: "no readiness source"}
	if s.cfg.Ready != nil {
		st.Ready, st.Reason = s.cfg.Ready()
	}
	if s.cfg.Datapath != nil {
		st.Datapath = datapathStatus(s.cfg.Datapath.Status())
		for f, n := range s.cfg.Datapath.Repairs() {
			if n > 0 {
				if st.Datapath.Repairs == nil {
					st.Datapath.Repairs = map[string]uint64{}
				}
				st.Datapath.Repairs[string(f)] = n
			}
		}
		for _, p := range st.Datapath.Problems {
			st.Problems = append(st.Problems, "data path: "+p)
		}
	}
	snap := s.cfg.Snapshot()
	st.Snapshot = SnapshotStatus{Generation: snap.Generation, Workloads: len(snap.Workloads()),
		LocalWorkloads: len(snap.LocalWorkloads(s.cfg.Node)), Services: len(snap.Services()), Nodes: len(snap.Nodes())}
	if s.cfg.Pods != nil {
		for _, p := range s.cfg.Pods() {
			if p.Ifindex != 0 && p.Err == "" {
				st.Snapshot.Enrolled++
				continue
			}
			st.Snapshot.Pending++
			why := p.Err
			if why == "" {
				why = "not enrolled yet"
			}
			if p.Reason != "" {
				st.Problems = append(st.Problems, fmt.Sprintf("pod %s refused (%s), not captured: %s", p.Pod, p.Reason, why))
				continue
			}
			st.Problems = append(st.Problems, fmt.Sprintf("pod %s pending: %s", p.Pod, why))
		}
	}
	if s.cfg.Source != nil {
		c := s.cfg.Source()
		st.Config = ConfigStatus{Available: true, Source: c.Kind, File: c.Where, Applied: c.Applied, Rejected: c.Rejected,
			AppliedAt: c.AppliedAt, RejectedAt: c.RejectedAt, LastEditRejected: c.LastEditRejected, LastEditProblems: c.Problems}
		if c.LastEditRejected {
			st.Problems = append(st.Problems, configProblem(c))
		}
		st.Config.Unreachable = c.Unreachable
		if c.Unreachable {
			st.Config.UnreachableSince = c.UnreachableSince
			st.Problems = append(st.Problems, fmt.Sprintf("source: %s unreachable since %s; the last state stays in force",
				c.Where, c.UnreachableSince.UTC().Format(time.RFC3339)))
		}
	}
	if s.cfg.Policy != nil {
		st.Policy = PolicyStatus{Available: true, Generation: s.cfg.Policy.Generation()}
		if s.cfg.Policies != nil {
			st.Policy.Policies = len(s.cfg.Policies())
		}
	}
	if s.cfg.Certificates != nil {
		now := s.cfg.Now()
		for _, c := range s.cfg.Certificates() {
			st.Certs.Identities++
			id := c.ID.String()
			switch {
			case c.NotAfter.IsZero():
			case !now.Before(c.NotAfter):
				st.Certs.Expired = append(st.Certs.Expired, id)
				st.Problems = append(st.Problems, fmt.Sprintf("certificate of %s expired at %s", id, c.NotAfter.UTC().Format(time.RFC3339)))
			case c.NotAfter.Sub(now) < WarnWithin(c.NotBefore, c.NotAfter):
				st.Certs.Expiring = append(st.Certs.Expiring, id)
				st.Problems = append(st.Problems, fmt.Sprintf("certificate of %s expires in %s", id, c.NotAfter.Sub(now).Round(time.Second)))
			}
			if c.Failures > 0 {
				st.Certs.Failing = append(st.Certs.Failing, id)
				st.Problems = append(st.Problems, fmt.Sprintf("certificate of %s: %d failed attempts, last: %s", id, c.Failures, c.LastError))
			}
		}
	}
	if s.cfg.Bundles != nil {
		for _, b := range s.cfg.Bundles() {
			tb := TrustBundle{TrustDomain: b.TrustDomain.Name(), Roots: []BundleRoot{}, ChangedAt: b.ChangedAt, CheckedAt: b.CheckedAt,
				Failures: b.Failures, LastError: b.LastError, Federated: b.Federated, Source: b.Source, Reloads: b.Reloads}
			for _, r := range b.Roots {
				tb.Roots = append(tb.Roots, BundleRoot{Fingerprint: r.Fingerprint, Subject: r.Subject, NotAfter: r.NotAfter, Signing: r.Signing})
			}
			if b.Failures > 0 {
				st.Problems = append(st.Problems, fmt.Sprintf("trust bundle of %s: %d failed reads, the last good one stays in use; last: %s",
					tb.TrustDomain, b.Failures, b.LastError))
			}
			st.Bundles = append(st.Bundles, tb)
		}
	}
	if s.cfg.OpenFlows != nil {
		st.Flows.Open = s.cfg.OpenFlows()
	}
	if s.cfg.Flows != nil {
		st.Flows.Logged = s.cfg.Flows.Total()
	}
	return st
}

// configProblem says that the newest version of the cluster file was
// rejected, and its first problem.
func configProblem(c source.Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "config: last edit rejected at %s", c.RejectedAt.UTC().Format(time.RFC3339))
	if len(c.Problems) > 0 {
		b.WriteString(": ")
		b.WriteString(c.Problems[0])
	}
	switch n := len(c.Problems) - 1; {
	case n == 1:
		b.WriteString(" (and 1 more problem)")
	case n > 1:
		fmt.Fprintf(&b, " (and %d more problems)", n)
	}
	return b.String()
}

func datapathStatus(b bpf.Status) DatapathStatus {
	d := DatapathStatus{Available: true, SkLookupAttached: b.SkLookupAttached, Pods: len(b.Pods), Uplinks: len(b.Uplinks),
		Listeners: []string{}}
	for _, sl := range b.Listeners {
		d.Listeners = append(d.Listeners, sl.String())
	}
	for _, p := range b.Problems {
		d.Problems = append(d.Problems, p.Detail)
	}
	return d
}

func (s *Server) workloads(w http.ResponseWriter, r *http.Request) {
	snap := s.cfg.Snapshot()
	pods := map[string]agent.PodStatus{}
	if s.cfg.Pods != nil {
		for _, p := range s.cfg.Pods() {
			pods[p.Pod] = p
		}
	}
	ns := r.URL.Query().Get("namespace")
	out := []Workload{}
	for _, wl := range snap.Workloads() {
		if ns != "" && wl.Namespace != ns {
			continue
		}
		v := Workload{Namespace: wl.Namespace, Name: wl.Name, UID: wl.UID, ServiceAccount: wl.ServiceAccount, Node: wl.Node,
			Labels: wl.Labels, Enrolled: wl.Enrolled, Local: wl.Node == s.cfg.Node, IPs: []string{}}
		if v.ServiceAccount == "" {
			v.ServiceAccount = "default"
		}
		if id, err := wl.ID(s.cfg.TrustDomain); err == nil && wl.Enrolled {
			v.Identity = id.String() // unmeshed pods have no identity in the mesh
		}
		for _, ip := range wl.IPs {
			v.IPs = append(v.IPs, ip.String())
		}
		if v.Local && wl.Enrolled {
			if p, ok := pods[wl.String()]; ok {
				v.Veth, v.Error, v.Strict = p.Ifindex, p.Err, p.Strict
				v.State = "enrolled"
				if p.Ifindex == 0 || p.Err != "" {
					v.State = "pending"
				}
			} else if s.cfg.Pods != nil {
				v.State = "pending"
			}
		}
		if s.cfg.Policy != nil && wl.Enrolled {
			v.MTLSMode = string(s.cfg.Policy.MTLSMode(wl))
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b Workload) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	writeJSON(w, out)
}

func (s *Server) services(w http.ResponseWriter, r *http.Request) {
	snap := s.cfg.Snapshot()
	ns := r.URL.Query().Get("namespace")
	out := []Service{}
	for _, svc := range snap.Services() {
		if ns != "" && svc.Namespace != ns {
			continue
		}
		v := Service{Namespace: svc.Namespace, Name: svc.Name, VIPs: []string{}, Ports: []ServicePort{}, Endpoints: []string{}}
		for _, ip := range svc.VIPs {
			v.VIPs = append(v.VIPs, ip.String())
		}
		for _, p := range svc.Ports {
			v.Ports = append(v.Ports, ServicePort{Name: p.Name, Port: p.Port, TargetPort: p.TargetPort})
		}
		for _, uid := range svc.Endpoints {
			if wl := snap.WorkloadByUID(uid); wl != nil {
				v.Endpoints = append(v.Endpoints, wl.String())
			}
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	writeJSON(w, out)
}

func (s *Server) policies(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Policy == nil {
		writeError(w, http.StatusNotFound, "this agent runs without a policy engine")
		return
	}
	out := Policies{Generation: s.cfg.Policy.Generation(), Policies: []json.RawMessage{}}
	if s.cfg.Policies != nil {
		for _, p := range s.cfg.Policies() {
			b, err := json.Marshal(p)
			if err != nil {
				writeError(w, http.StatusInternalServerError, fmt.Sprintf("policy %s/%s: %v", p.Namespace, p.Name, err))
				return
			}
			out.Policies = append(out.Policies, b)
		}
	}
	writeJSON(w, out)
}

func (s *Server) certs(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Certificates == nil {
		writeError(w, http.StatusNotFound, "this agent has no certificate manager")
		return
	}
	now := s.cfg.Now()
	out := []Cert{}
	for _, c := range s.cfg.Certificates() {
		v := Cert{Identity: c.ID.String(), Serial: c.Serial, NotBefore: c.NotBefore, NotAfter: c.NotAfter,
			IssuedAt: c.IssuedAt, RenewAt: c.RenewAt, Failures: c.Failures, LastError: c.LastError, Root: c.Root}
		if !c.NotAfter.IsZero() {
			v.ExpiresInSeconds = c.NotAfter.Sub(now).Seconds()
		}
		out = append(out, v)
	}
	writeJSON(w, out)
}

func (s *Server) datapath(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Datapath == nil {
		writeError(w, http.StatusNotFound, "this agent runs without an eBPF data path")
		return
	}
	out := DatapathInfo{DatapathStatus: datapathStatus(s.cfg.Datapath.Status())}
	n, err := s.cfg.Datapath.Counters()
	if err != nil {
		out.Error = err.Error()
	} else {
		out.Counters = CounterMap(n)
	}
	writeJSON(w, out)
}

// CounterMap names the data path's counters as the
// mantlet_datapath_packets_total metric's event label does.
func CounterMap(n bpf.Counters) map[string]uint64 {
	out := map[string]uint64{}
	for _, e := range n.Events() {
		out[e.Name] = e.Value
	}
	return out
}

// flowFilter reads the filters of /v1/flows.
func flowFilter(r *http.Request) (telemetry.FlowFilter, int, error) {
	q := r.URL.Query()
	f := telemetry.FlowFilter{Verdict: q.Get("verdict"), Namespace: q.Get("namespace"), Workload: q.Get("workload"), Event: q.Get("event")}
	switch f.Verdict {
	case "", events.Allowed, events.Denied:
	default:
		return f, 0, fmt.Errorf("verdict %q: want allowed or denied", f.Verdict)
	}
	switch f.Event {
	case "", events.Open, events.Close:
	default:
		return f, 0, fmt.Errorf("event %q: want open or close", f.Event)
	}
	limit := 0
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return f, 0, fmt.Errorf("limit %q: want a number ≥ 0", v)
		}
		limit = n
	}
	return f, limit, nil
}

func (s *Server) flows(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Flows == nil {
		writeError(w, http.StatusNotFound, "this agent keeps no flow log")
		return
	}
	f, limit, err := flowFilter(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if r.URL.Query().Get("follow") == "" {
		out := s.cfg.Flows.Recent(f, limit)
		if out == nil {
			out = []events.Flow{}
		}
		writeJSON(w, out)
		return
	}
	// Subscribe before reading the ring, so no event falls in between
	// (one may show twice).
	fo, err := s.cfg.Flows.Follow(f, 1024)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error()+"; try again later")
		return
	}
	defer fo.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	if limit > 0 {
		for _, ev := range s.cfg.Flows.Recent(f, limit) {
			if enc.Encode(ev) != nil {
				return
			}
		}
	}
	if rc.Flush() != nil {
		return
	}
	keepalive := time.NewTicker(15 * time.Second)
	defer keepalive.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case ev := <-fo.C():
			if enc.Encode(ev) != nil {
				return
			}
			// Send what else is queued before flushing.
			for more := true; more; {
				select {
				case ev := <-fo.C():
					if enc.Encode(ev) != nil {
						return
					}
				default:
					more = false
				}
			}
		case <-keepalive.C:
		}
		if n := fo.Lost(); n > 0 {
			if enc.Encode(Lost{Event: "lost", Lost: n}) != nil {
				return
			}
		}
		if rc.Flush() != nil {
			return
		}
	}
}

func (s *Server) check(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Policy == nil {
		writeError(w, http.StatusNotFound, "this agent runs without a policy engine")
		return
	}
	q := r.URL.Query()
	res, err := s.Check(q.Get("from"), q.Get("to"), q.Get("port"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	writeJSON(w, res)
}

// Check evaluates a hypothetical connection with the live engine and
// snapshot. from is a SPIFFE ID, namespace/serviceaccount, or an IP; to a
// workload (namespace/name), a service (namespace/name when no workload
// has that name), ip:port, or an IP; port is needed unless to has one.
// The destination is resolved and the engine asked exactly as the data
// path does: with ztunnel.Resolve and enforce.Input.
func (s *Server) Check(from, to, port string) (Check, error) {
	var res Check
	if from == "" || to == "" {
		return res, errors.New("from and to are required")
	}
	snap := s.cfg.Snapshot()
	var f ztunnel.Flow

	// The source.
	switch ip, err := netip.ParseAddr(from); {
	case strings.HasPrefix(from, "spiffe://"):
		id, err := spiffeid.FromString(from)
		if err != nil {
			return res, fmt.Errorf("from %q: %w", from, err)
		}
		f.SrcID, f.MTLS = id, true
	case err == nil:
		f.SrcAddr = netip.AddrPortFrom(ip, 0)
		res.Source.IP = ip.String()
		if f.Src = snap.WorkloadByIP(ip); f.Src != nil {
			res.Source.Workload = f.Src.String()
			if f.Src.Enrolled {
				id, err := f.Src.ID(s.cfg.TrustDomain)
				if err != nil {
					return res, fmt.Errorf("from %s: %w", from, err)
				}
				f.SrcID, f.MTLS = id, true
			}
		}
	case strings.Count(from, "/") == 1:
		ns, sa, _ := strings.Cut(from, "/")
		id, err := identity.WorkloadID(s.cfg.TrustDomain, ns, sa)
		if err != nil {
			return res, fmt.Errorf("from %q: want namespace/serviceaccount, a SPIFFE ID or an IP", from)
		}
		f.SrcID, f.MTLS = id, true
	default:
		return res, fmt.Errorf("from %q: want namespace/serviceaccount, a SPIFFE ID or an IP", from)
	}

	// The destination: an address, or a workload or service by name (its
	// address), resolved as the ztunnel resolves where a pod connects.
	var p uint16
	if port != "" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return res, fmt.Errorf("port %q: want 1-65535", port)
		}
		p = uint16(n)
	}
	if ap, err := netip.ParseAddrPort(to); err == nil {
		f.DstAddr = ap
	} else if ip, err := netip.ParseAddr(to); err == nil {
		if p == 0 {
			return res, fmt.Errorf("to %s: give a port (--port, or ip:port)", to)
		}
		f.DstAddr = netip.AddrPortFrom(ip, p)
	} else if ns, name, ok := strings.Cut(to, "/"); ok && ns != "" && name != "" {
		var ip netip.Addr
		if w := findWorkload(snap, ns, name); w != nil {
			ip = w.IPs[0]
		} else if svc := findService(snap, ns, name); svc == nil {
			return res, fmt.Errorf("to %s: no workload or service of that name (see mantlet workloads)", to)
		} else if len(svc.VIPs) == 0 {
			return res, fmt.Errorf("to %s: the service has no address", to)
		} else {
			ip = svc.VIPs[0]
		}
		if p == 0 {
			return res, fmt.Errorf("to %s: give a port (--port)", to)
		}
		f.DstAddr = netip.AddrPortFrom(ip, p)
	} else {
		return res, fmt.Errorf("to %q: want namespace/name, ip:port or an IP with --port", to)
	}
	svc, target, dst := ztunnel.Resolve(snap, f.DstAddr, 0)
	f.DstAddr, f.Dst = target, dst
	if svc != nil {
		res.Destination.Service = svc.String()
	}

	in := enforce.Input(&f)
	d := s.cfg.Policy.Decide(in)
	res.Source.MTLS = in.MTLS
	if in.MTLS {
		res.Source.Identity = in.SrcID.String()
	}
	res.Destination.IP, res.Destination.Port = f.DstAddr.Addr().String(), in.DstPort
	if in.Dst != nil {
		res.Destination.Workload, res.Destination.Meshed = in.Dst.String(), true
		if id, err := in.Dst.ID(s.cfg.TrustDomain); err == nil {
			res.Destination.Identity = id.String()
		}
		res.Destination.MTLSMode = string(s.cfg.Policy.MTLSMode(in.Dst))
	}
	res.Allowed, res.Reason, res.Action, res.Policy, res.Rule = d.Allowed, d.Reason.String(), string(d.Action), d.Policy, d.Rule
	res.Verdict = events.Denied
	if d.Allowed {
		res.Verdict = events.Allowed
	}
	for _, h := range d.AuditHits() {
		res.Audit = append(res.Audit, AuditHit{Policy: h.Policy, Rule: h.Rule})
	}
	res.Generation = s.cfg.Policy.Generation()
	res.RuleSpec = s.ruleSpec(d.Policy, d.Rule)
	res.Message = message(d)
	return res, nil
}

func findWorkload(snap *workload.Snapshot, ns, name string) *workload.Workload {
	for _, w := range snap.Workloads() {
		if w.Namespace == ns && w.Name == name {
			return w
		}
	}
	return nil
}

func findService(snap *workload.Snapshot, ns, name string) *workload.Service {
	for _, s := range snap.Services() {
		if s.Namespace == ns && s.Name == name {
			return s
		}
	}
	return nil
}

// ruleSpec returns rule i of policy key (namespace/name) as JSON.
func (s *Server) ruleSpec(key string, i int) json.RawMessage {
	if key == "" || i < 0 || s.cfg.Policies == nil {
		return nil
	}
	for _, p := range s.cfg.Policies() {
		if p.Namespace+"/"+p.Name != key || i >= len(p.Spec.Rules) {
			continue
		}
		b, err := json.Marshal(p.Spec.Rules[i])
		if err != nil {
			return nil
		}
		return b
	}
	return nil
}

// message says a decision in a sentence.
func message(d policy.Decision) string {
	switch d.Reason {
	case policy.ReasonAllowedByDefault:
		return "no policy selects the destination: allowed by default"
	case policy.ReasonNotMeshed:
		return "the destination is not in the mesh: mesh policy does not apply (allowed)"
	case policy.ReasonAllowedByPolicy:
		return fmt.Sprintf("allowed by rule %d of ALLOW policy %s", d.Rule, d.Policy)
	case policy.ReasonDeniedByPolicy:
		return fmt.Sprintf("denied by rule %d of DENY policy %s", d.Rule, d.Policy)
	case policy.ReasonDeniedByDefaultDeny:
		return "no ALLOW policy selects the destination and default-deny applies to it: denied"
	case policy.ReasonNoAllowMatched:
		return "ALLOW policies select the destination but none of their rules matches: denied"
	case policy.ReasonPlaintextStrict:
		if d.Policy != "" {
			return fmt.Sprintf("plaintext source, and the destination is STRICT (set by policy %s): denied", d.Policy)
		}
		return "plaintext source, and the destination is STRICT (the mesh's default mode): denied"
	}
	return d.Reason.String()
}
