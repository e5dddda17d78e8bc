// Package node assembles one mesh node: the eBPF data path, the SVID
// manager, policy enforcement, the ztunnel, the agent's reconcile loop, the
// admin API, metrics and readiness, fed by one source of desired state.
// Run is what 'mantlet agent' runs; the command only turns flags into a
// Config. Every desired state a source emits is put in force in one step
// (the policy engine and the ztunnel's workloads switch together, then the
// agent enrolls and open flows are decided again), and nothing below the
// node knows which source it came from.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/cni"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/enforce"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/telemetry"
	"github.com/mantlet/mantlet/ztunnel"
)

// Config is everything a node needs. Node, Issuer, TrustDomain, Source and
// Datapath.PinDir are required.
type Config struct {
	// Node is this node's name, as pods' spec.nodeName say.
	Node string
	// Issuer signs the SVIDs of the node's pods; TrustDomain names them.
	Issuer      identity.Issuer
	TrustDomain spiffeid.TrustDomain
	// Federation lists the bundles of foreign trust domains whose
	// workloads the node's pods may talk to (none: one trust domain);
	// FederationPoll is how often their files are checked for changes
	// (default identity.DefaultFederationPoll).
	Federation     []identity.FederatedBundle
	FederationPoll time.Duration
	// Source gives the desired state of the cluster.
	Source source.Source
	// DefaultMTLS is the mode of pods for which nothing else chooses one
	// (default PERMISSIVE).
	DefaultMTLS v1alpha1.MTLSMode
	// Datapath configures the eBPF data path; Run adds the node's own
	// addresses (its Node object's and its interfaces') to NodeIPs.
	Datapath bpf.Config
	// Uplinks are the interfaces leading to other nodes (default: the
	// interfaces that hold the node's addresses).
	Uplinks []string
	// OutboundAddr and HBONEAddr are the ztunnel's capture listeners;
	// InboundPlainAddr the inbound plaintext one, empty when
	// Datapath.CaptureInboundPlain is off.
	OutboundAddr, HBONEAddr, InboundPlainAddr string
	// ReadyAddr serves the readiness probe, MetricsAddr the metrics; empty
	// disables either.
	ReadyAddr, MetricsAddr string
	// SVIDTTL is the lifetime of the pods' certificates (default
	// identity's); SVIDReissueSpread bounds how long after a root rotation
	// was activated they are all renewed under the new root (default
	// identity's).
	SVIDTTL, SVIDReissueSpread time.Duration
	// DrainTimeout bounds how long open connections may take to finish
	// once ctx ends.
	DrainTimeout time.Duration
	// Resync is how often the agent re-checks every pod (default agent's);
	// WatchInterval how often the data path is checked for missing state
	// (default bpf's).
	Resync, WatchInterval time.Duration
	// SourceGrace is how long the source may be unreachable (the API server
	// does not answer) before the node says it is not ready; the last
	// state stays in force meanwhile (default DefaultSourceGrace).
	SourceGrace time.Duration
	// Observe and Policy configure telemetry, the admin API and policy
	// enforcement.
	Observe ObserveConfig
	Policy  PolicyConfig
	// Limits bound the ztunnel's accept path.
	Limits LimitsConfig
	// CleanupHint is the command that removes what the node leaves pinned,
	// for the last log line.
	CleanupHint string
	// Logger receives the node's logs; nil discards them.
	Logger *slog.Logger
	// Kernel is the machine; nil is HostKernel{}.
	Kernel Kernel
	// CNI, if set, serves mantlet's CNI plugin so that new pods are
	// enrolled before their containers start, and installs the plugin
	// (Kubernetes mode; the source must take the plugin's addresses).
	CNI *CNIConfig
}

// Run runs the node until ctx ends, then drains open connections for up to
// DrainTimeout and returns nil; or until one of its parts fails, and
// returns that failure. Everything that can be checked without changing
// the kernel comes first (the source's first state, the node's name, the
// addresses, the output files and ports of observability), so that a typo
// fails before the data path is loaded. A start that fails after the data
// path was loaded removes it if Run made it; a data path adopted from an
// earlier agent stays, as it protects that agent's pods. After a clean
// stop the programs and maps stay pinned, so enrolled pods keep their
// protection.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k := cfg.Kernel
	if k == nil {
		k = HostKernel{}
	}
	switch {
	case cfg.Node == "":
		return errors.New("node: config: Node is required")
	case cfg.Issuer == nil || cfg.Source == nil:
		return errors.New("node: config: Issuer and Source are required")
	}
	var undo cleanups
	defer undo.run()

	// 1. Checks that change nothing.
	if c, ok := cfg.Source.(interface{ Close() }); ok {
		undo.add(c.Close) // a source that holds informers
	}
	fed, err := identity.NewFederation(cfg.TrustDomain, cfg.Federation, log.With("component", "federation"))
	if err != nil {
		return err
	}
	first, err := cfg.Source.Initial(ctx)
	if err != nil {
		return err
	}
	where := cfg.Source.Status().Where
	nodeIPs, err := nodeAddrs(first.Snapshot, cfg.Node, where)
	if err != nil {
		return err
	}
	if err := checkTrustDomain(first.Snapshot, cfg.Node, cfg.TrustDomain); err != nil {
		return err
	}
	if len(nodeIPs) == 0 {
		log.Warn("the desired state has no Node of this name, only pods on it; its own addresses are taken from its interfaces only", "node", cfg.Node, "source", where)
	}
	en, err := newEnforcement(&cfg.Policy, cfg.Node, cfg.TrustDomain, cfg.DefaultMTLS, log.With("component", "policy"))
	if err != nil {
		return err
	}
	undo.add(en.close)
	if err := en.apply(first); err != nil {
		return err
	}
	ifaceIPs, err := k.InterfaceAddrs()
	if err != nil {
		return err
	}
	bcfg := cfg.Datapath
	bcfg.NodeIPs = mergeAddrs(bcfg.NodeIPs, nodeIPs, ifaceIPs)
	if err := bcfg.Validate(); err != nil {
		return err
	}
	obsv, err := newObservability(&cfg.Observe, cfg.Node, filepath.Base(bcfg.PinDir), log.With("component", "admin"))
	if err != nil {
		return err
	}
	undo.add(obsv.close)

	// 2. The data path: programs, maps, routing; adopted if pinned.
	dp, err := k.OpenDatapath(ctx, bcfg, log.With("component", "bpf"))
	if err != nil {
		return err
	}
	undo.add(func() { dp.Close() }) // programs and maps stay pinned
	running := false
	undo.add(func() {
		if running || !dp.Created() {
			return
		}
		rep, err := dp.Remove(context.WithoutCancel(ctx))
		if err != nil {
			log.Error("start failed; rolling back the data path failed too", "error", err, "remove_with", cfg.CleanupHint)
			return
		}
		log.Info("start failed; rolled the data path back: "+rep.String(), "node", cfg.Node)
	})
	uplinks := cfg.Uplinks
	if len(uplinks) == 0 {
		if uplinks, err = k.FindUplinks(nodeIPs); err != nil {
			return err
		}
	}
	for _, name := range uplinks {
		if err := dp.AttachUplink(name); err != nil {
			return err
		}
	}
	links, closeLinks, err := k.Links()
	if err != nil {
		return err
	}
	undo.add(closeLinks)
	// Pods that turn STRICT lose their plaintext connections that bypassed
	// the ztunnel; the node's addresses (probes) keep theirs.
	plain, closePlain, err := k.Plaintext(bcfg.NodeIPs)
	if err != nil {
		return err
	}
	undo.add(closePlain)

	// 3. The ztunnel's listeners, in the SOCKMAP.
	listen := func(addr string, slot bpf.Slot) (net.Listener, error) {
		ln, err := k.Listen(ctx, addr, bcfg.ZtunnelMark)
		if err != nil {
			return nil, fmt.Errorf("listen %s (%s): %w", addr, slot, err)
		}
		undo.add(func() { ln.Close() })
		sc, ok := ln.(syscall.Conn)
		if !ok {
			return nil, fmt.Errorf("listen %s (%s): %T has no file descriptor", addr, slot, ln)
		}
		if err := dp.SetListener(slot, sc); err != nil {
			return nil, err
		}
		return ln, nil
	}
	zcfg := ztunnel.Config{NodeName: cfg.Node, TrustDomain: cfg.TrustDomain, Mark: int(bcfg.ZtunnelMark), Transparent: true,
		Logger: log.With("component", "ztunnel")}
	if zcfg.Outbound, err = listen(cfg.OutboundAddr, bpf.Outbound); err != nil {
		return err
	}
	if zcfg.HBONE, err = listen(cfg.HBONEAddr, bpf.HBONE); err != nil {
		return err
	}
	if cfg.InboundPlainAddr != "" {
		if zcfg.InboundPlaintext, err = listen(cfg.InboundPlainAddr, bpf.InboundPlain); err != nil {
			return err
		}
	}

	// The ztunnel's share of the open-file limit: what is open now (the
	// data path, the listeners) is the agent's.
	if zcfg.Limits, err = cfg.Limits.ztunnelLimits(log.With("component", "ztunnel")); err != nil {
		return err
	}
	if cfg.Limits.HandshakeTimeout > 0 {
		zcfg.Tuning.HandshakeTimeout = cfg.Limits.HandshakeTimeout
	}
	zcfg.Tuning.MaxStreamsPerConn = cfg.Limits.StreamsPerConn
	zcfg.Tuning.MaxConnsPerKey = cfg.Limits.ConnsPerKey
	zcfg.Tuning.SpreadConnsPerKey = cfg.Limits.SpreadConnsPerKey
	zcfg.Tuning.KeyExchange = cfg.Limits.KeyExchange
	if zcfg.Tuning.SpreadConnsPerKey == 0 {
		zcfg.Tuning.SpreadConnsPerKey = runtime.GOMAXPROCS(0)
	}

	// 4. Identities, the ztunnel and the agent, and the first state.
	ids := identity.NewManager(cfg.Issuer, cfg.TrustDomain, log.With("component", "identity"), obsv.identityOptions(identity.ManagerOptions{TTL: cfg.SVIDTTL, ReissueSpread: cfg.SVIDReissueSpread}))
	obsv.ids = ids
	store := workload.NewStore()
	zcfg.Store, zcfg.SVIDs, zcfg.Bundles = store, ids, identity.TrustBundles(cfg.TrustDomain, ids, fed)
	obsv.ztunnelHooks(&zcfg)
	en.ztunnelHooks(&zcfg)
	zcfg.Authorizer = en.az
	proxy, err := ztunnel.New(zcfg)
	if err != nil {
		return err
	}
	undo.add(proxy.Close)
	// The plugin chained in the node's network is part of readiness: a
	// ready agent's node holds new meshed pods until they are enrolled.
	var cniInst *cniInstall
	if cfg.CNI != nil && cfg.CNI.ConfDir != "" {
		cniInst = &cniInstall{}
	}
	ag, err := agent.New(agent.Config{
		Node: cfg.Node, TrustDomain: cfg.TrustDomain, DefaultMTLS: cfg.DefaultMTLS, MTLSMode: en.mtlsMode,
		Datapath: dp, Links: links, Identities: ids, Plaintext: plain,
		Ready:  allReady(sourceReady(cfg.Source, cfg.SourceGrace), cniInst.ready),
		Logger: log.With("component", "agent"), Resync: cfg.Resync,
	})
	if err != nil {
		return err
	}
	store.Replace(first.Snapshot)
	ag.Apply(agent.State{Snapshot: first.Snapshot})
	// publish puts a later state in force: the engine and the ztunnel's
	// workloads together, then the agent's enrolments, then every open
	// flow is decided again. A state the engine refuses changes nothing.
	publish := func(st *source.State) {
		if err := en.apply(st); err != nil {
			log.Error("desired state refused; the previous one stays in force", "generation", st.Generation, "error", err)
			return
		}
		store.Replace(st.Snapshot)
		ag.Apply(agent.State{Snapshot: st.Snapshot})
		en.reevaluate(proxy, st.Snapshot)
	}

	var cniLn net.Listener
	var cniEnroll *cniEnroller
	if cfg.CNI != nil {
		an, ok := cfg.Source.(podAnnouncer)
		if !ok {
			return fmt.Errorf("node: the CNI plugin needs a source that takes pods' addresses from it (Kubernetes); %s does not", where)
		}
		sock := cfg.CNI.Socket
		if sock == "" {
			sock = cni.DefaultSocket
		}
		if cniLn, err = cni.Listen(sock); err != nil {
			return err
		}
		undo.add(func() { cniLn.Close() })
		cniEnroll = newCNIEnroller(an, store, ag)
	}

	var servers []*http.Server
	if cfg.ReadyAddr != "" {
		servers = append(servers, &http.Server{Addr: cfg.ReadyAddr, Handler: ag.Handler(), ReadHeaderTimeout: 5 * time.Second})
	}
	if cfg.MetricsAddr != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), telemetry.NewProcessCollector(),
			agent.NewCollector(ag, cfg.Source, dp, func() map[string]uint64 {
				out := map[string]uint64{}
				for flag, n := range proxy.Counters() {
					out[flag.String()] = n
				}
				return out
			}))
		reg.MustRegister(obsv.collectors(proxy)...)
		reg.MustRegister(telemetry.NewBundles(func() []identity.BundleInfo { return append(ids.Bundles(), fed.Bundles()...) }))
		reg.MustRegister(newAdmissionCollector(proxy.Admission))
		reg.MustRegister(enforce.NewCollector(en.az), events.NewCollector(en.ev, "mantlet_security_events_total",
			"Security events, by result: written, suppressed (rate_limited, queue_full) or lost to a failed write (failed)."))
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", telemetry.MetricsHandler(reg))
		servers = append(servers, &http.Server{Addr: cfg.MetricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second})
	}
	serverLns := make([]net.Listener, len(servers))
	for i, s := range servers {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		if serverLns[i], err = lc.Listen(ctx, "tcp", s.Addr); err != nil {
			return fmt.Errorf("listen %s: %w", s.Addr, err)
		}
		undo.add(func() { serverLns[i].Close() })
	}

	// 5. Run until ctx ends or a part fails, then drain.
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	g := newGroup(runCtx)
	running = true
	g.run("identity", func() error { return ids.Run(runCtx) })
	g.run("federation", func() error { return fed.Run(runCtx, cfg.FederationPoll) })
	g.run("data path watch", func() error { return dp.Watch(runCtx, cfg.WatchInterval) })
	g.run("ztunnel", func() error { return proxy.Run(runCtx) })
	g.run("memory release", func() error {
		releaseOnceSettled(runCtx, ag.Settled, log.With("component", "memory"))
		releaseMemory(runCtx, func() load { return load{flows: proxy.NumOpenFlows(), conns: proxy.HBONEConns()} },
			log.With("component", "memory"))
		return nil
	})
	g.run("agent", func() error { return ag.Run(runCtx) })
	g.run("source", func() error { return cfg.Source.Run(runCtx, publish) })
	if cniLn != nil {
		g.run("cni", func() error {
			return cni.Serve(runCtx, cniLn, cniEnroll, cni.ServerOptions{AddTimeout: cfg.CNI.addTimeout(), Logger: log.With("component", "cni")})
		})
		if cfg.CNI.ConfDir != "" {
			g.run("cni install", func() error { return runCNIInstall(runCtx, *cfg.CNI, cniInst, log.With("component", "cni")) })
		}
	}
	// The agent's pods, and the pods it refused whose sandbox is gone.
	pods := ag.Pods
	if cniEnroll != nil {
		pods = cniEnroll.Pods
	}
	if rep, ok := cfg.Source.(source.Reporter); ok {
		g.run("report", func() error {
			return rep.Report(runCtx, cfg.Node, func() []source.PodReport { return podReports(pods()) }, ag.Changed())
		})
	}
	g.run("security events", func() error {
		en.ev.Run(runCtx)
		return nil
	})
	obsv.run(runCtx, g, proxy, admin.Config{Node: cfg.Node, TrustDomain: cfg.TrustDomain, Snapshot: store.Load, Ready: ag.Ready,
		Pods: pods, Datapath: dp, Source: cfg.Source.Status, Policy: en.eng, Policies: en.policies,
		Certificates: ids.Certificates, Bundles: func() []identity.BundleInfo { return append(ids.Bundles(), fed.Bundles()...) }, Logger: log.With("component", "admin")})
	for i, s := range servers {
		g.run("http "+s.Addr, func() error {
			if err := s.Serve(serverLns[i]); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	log.Info("agent running", "node", cfg.Node, "trust_domain", cfg.TrustDomain.Name(), "federated", fed.TrustDomains(), "source", where,
		"pin_dir", bcfg.PinDir, "uplinks", uplinks, "outbound", zcfg.Outbound.Addr().String(), "hbone", zcfg.HBONE.Addr().String(),
		"ready", cfg.ReadyAddr, "metrics", cfg.MetricsAddr, "admin", obsv.addrs(), "default_mtls", string(cfg.DefaultMTLS))
	// The first lists of a large cluster leave more garbage than the state
	// they made (10,000 pods decoded whole before being stripped), and
	// the start touched most of the binary once: give both back now
	// rather than keep them resident.
	release(log, "the agent started")

	select {
	case <-ctx.Done():
		log.Info("shutting down: draining connections", "timeout", cfg.DrainTimeout)
	case <-g.ctx.Done():
		log.Error("shutting down after a failure", "error", context.Cause(g.ctx))
	}
	ag.Drain()
	drainCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.DrainTimeout)
	if err := proxy.Shutdown(drainCtx); err != nil {
		log.Warn("drain timed out; closing the remaining connections", "error", err)
	}
	cancel()
	for _, s := range servers {
		s.Close()
	}
	stop()
	err = g.wait()
	log.Info("agent stopped; programs and maps stay pinned so enrolled pods stay protected",
		"pin_dir", bcfg.PinDir, "remove_with", cfg.CleanupHint)
	return err
}

// DefaultSourceGrace is Config.SourceGrace's default.
const DefaultSourceGrace = 2 * time.Minute

// sourceReady fails readiness once src has been unreachable longer than
// grace.
func sourceReady(src source.Source, grace time.Duration) func() (bool, string) {
	if grace <= 0 {
		grace = DefaultSourceGrace
	}
	return func() (bool, string) {
		st := src.Status()
		if st.Unreachable && time.Since(st.UnreachableSince) > grace {
			return false, fmt.Sprintf("the %s source (%s) has been unreachable for %s; the last state stays in force",
				st.Kind, st.Where, time.Since(st.UnreachableSince).Round(time.Second))
		}
		return true, ""
	}
}

// allReady is ready when every one of checks is (nil checks are).
func allReady(checks ...func() (bool, string)) func() (bool, string) {
	return func() (bool, string) {
		for _, c := range checks {
			if c == nil {
				continue
			}
			if ok, why := c(); !ok {
				return false, why
			}
		}
		return true, ""
	}
}

// podReports turns the agent's view of its pods into what a source
// writes back.
func podReports(pods []agent.PodStatus) []source.PodReport {
	out := make([]source.PodReport, 0, len(pods))
	for _, p := range pods {
		ns, name, _ := strings.Cut(p.Pod, "/")
		out = append(out, source.PodReport{Namespace: ns, Name: name, UID: p.UID, Enrolled: p.Ifindex != 0 && p.Err == "", Strict: p.Strict, Err: p.Err, Reason: p.Reason})
	}
	return out
}

// cleanups undoes the steps of a start in reverse order.
type cleanups []func()

func (c *cleanups) add(f func()) { *c = append(*c, f) }

func (c *cleanups) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
	*c = nil
}

// group runs the node's long-running parts; the first to fail cancels
// ctx, and its error, named after the part, is what wait returns.
type group struct {
	g   *errgroup.Group
	ctx context.Context
}

func newGroup(ctx context.Context) *group {
	g, ctx := errgroup.WithContext(ctx)
	return &group{g: g, ctx: ctx}
}

func (g *group) run(name string, fn func() error) {
	g.g.Go(func() error {
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	})
}

func (g *group) wait() error { return g.g.Wait() }

// nodeAddrs returns the addresses the desired state gives the node named
// node. A name the state does not know at all (no Node object, no pod
// scheduled there) is an error naming the nodes it has: a typo must fail
// before anything is loaded into the kernel.
// checkTrustDomain refuses to run an agent whose node the desired state
// puts in another trust domain (mantlet.io/trust-domain): its pods would
// be named in a domain whose SVIDs the agent cannot get.
func checkTrustDomain(snap *workload.Snapshot, node string, td spiffeid.TrustDomain) error {
	for _, n := range snap.Nodes() {
		if n.Name == node && !n.TrustDomain.IsZero() && n.TrustDomain != td {
			return fmt.Errorf("node: node %s is annotated mantlet.io/trust-domain: %s, but this agent's trust domain is %s (--trust-domain, or its CA's): run it with a CA of %s, or fix the annotation",
				node, n.TrustDomain.Name(), td.Name(), n.TrustDomain.Name())
		}
	}
	return nil
}

func nodeAddrs(snap *workload.Snapshot, node, where string) ([]netip.Addr, error) {
	var (
		ips   []netip.Addr
		known bool
		names []string
	)
	seen := map[string]bool{}
	name := func(n string) {
		if n != "" && !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
		known = known || n == node
	}
	for _, n := range snap.Nodes() {
		name(n.Name)
		if n.Name == node {
			ips = append(ips, n.IP)
		}
	}
	for _, w := range snap.Workloads() {
		name(w.Node)
	}
	if known {
		return ips, nil
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("--node-name %s: %s names no nodes (no Node objects, no pods with spec.nodeName); add a Node named %s", node, where, node)
	}
	slices.Sort(names)
	return nil, fmt.Errorf("--node-name %s: %s has no node of this name; its nodes are %s", node, where, strings.Join(names, ", "))
}

// mergeAddrs returns the IPv4 addresses of lists, without duplicates or
// loopback addresses.
func mergeAddrs(lists ...[]netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, ip := range slices.Concat(lists...) {
		ip = ip.Unmap()
		if ip.Is4() && !ip.IsLoopback() && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	return out
}
