package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/agent/manifest"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/enforce"
	"github.com/mantlet/mantlet/ztunnel"
)

func init() {
	register(command{name: "agent", summary: "run the node agent and its ztunnel (standalone: workloads from a file)", run: runAgent})
}

// agentFlags are the flags of 'mantlet agent'. The names are a contract
// with users and their scripts: add, never rename.
type agentFlags struct {
	node          string
	config        string
	caDir         string
	trustDomain   string
	pinDir        string
	cleanup       bool
	mtlsMode      string
	excludeCIDRs  listFlag
	excludePorts  listFlag
	uplinks       listFlag
	outboundAddr  string
	hboneAddr     string
	inboundAddr   string
	inboundPlain  bool
	localPlain    bool
	readyAddr     string
	metricsAddr   string
	svidTTL       time.Duration
	drainTimeout  time.Duration
	logFormat     string
	logLevel      string
	ztunnelMark   uint
	redirectMark  uint
	routeTable    int
	rulePriority  int
	resync        time.Duration
	pollInterval  time.Duration
	watchInterval time.Duration
	passMark      uint
	observe       observeFlags // metrics, access log, admin API (agent_observe.go)
	policy        policyFlags  // policy enforcement, security events (agent_policy.go)
}

// listFlag is a flag that may be repeated or hold a comma-separated list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

func parseAgentFlags(e *env, args []string) (*agentFlags, error) {
	f := &agentFlags{}
	fs := newFlagSet(e, "agent", "--node-name N --config cluster.yaml --ca-dir D [flags]\n       mantlet agent --cleanup --node-name N")
	fs.StringVar(&f.node, "node-name", "", "name of this node, as pods' spec.nodeName say (required)")
	fs.StringVar(&f.config, "config", "", "cluster file: multi-document YAML of Kubernetes Namespace, Pod, Node, Service and MeshPolicy objects, watched for changes (required)")
	fs.StringVar(&f.caDir, "ca-dir", "", "directory of the CA made by 'mantlet ca init' (required)")
	fs.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of the identities (default: the CA's)")
	fs.StringVar(&f.pinDir, "pin-dir", "", "bpffs directory of this node's pinned programs and maps (default "+bpf.DefaultPinRoot+"/<node-name>)")
	fs.BoolVar(&f.cleanup, "cleanup", false, "detach every program, remove the routing rule and the pins of this node, then exit")
	fs.StringVar(&f.mtlsMode, "mtls-mode", "PERMISSIVE", "mTLS mode of workloads for which no MeshPolicy and no mantlet.io/mtls namespace annotation sets one: PERMISSIVE or STRICT")
	fs.Var(&f.excludeCIDRs, "exclude-cidr", "destination `CIDR` never captured (repeat or comma-separate)")
	fs.Var(&f.excludePorts, "exclude-port", "destination `port` never captured (repeat or comma-separate)")
	fs.Var(&f.uplinks, "uplink", "`interface` leading to other nodes, for HBONE capture (repeat or comma-separate; default: the interfaces holding the node's addresses)")
	fs.StringVar(&f.outboundAddr, "outbound-addr", ":15001", "listen address of the outbound capture listener")
	fs.StringVar(&f.hboneAddr, "hbone-addr", ":15008", "listen address of the HBONE listener")
	fs.StringVar(&f.inboundAddr, "inbound-plaintext-addr", ":15006", "listen address of the inbound plaintext listener (with --inbound-plaintext)")
	fs.BoolVar(&f.inboundPlain, "inbound-plaintext", true, "capture plaintext connections from other nodes to local pods (port 15006), so that policy (ipBlocks, AUDIT, rate limits, STRICT refusals with an event) and metrics apply to them")
	fs.BoolVar(&f.localPlain, "inbound-plaintext-local", false, "also capture plaintext from unmeshed pods of this node to PERMISSIVE pods (needs rp_filter 0 or 2 on lo; turns net.ipv4.tcp_early_demux off)")
	fs.StringVar(&f.readyAddr, "ready-addr", ":15021", "listen address of the readiness probe ("+agent.ReadyPath+"); empty disables it")
	fs.StringVar(&f.metricsAddr, "metrics-addr", ":15020", "listen address of the Prometheus metrics (/metrics); empty disables them")
	fs.DurationVar(&f.svidTTL, "svid-ttl", identity.DefaultSVIDTTL, "lifetime of workload certificates")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", 10*time.Second, "on SIGTERM, how long open connections may take to finish")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format on stderr: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.UintVar(&f.ztunnelMark, "ztunnel-mark", bpf.DefaultZtunnelMark, "SO_MARK of the ztunnel's sockets")
	fs.UintVar(&f.redirectMark, "redirect-mark", bpf.DefaultRedirectMark, "fwmark of captured packets (also the mask of the routing rule)")
	fs.IntVar(&f.routeTable, "route-table", bpf.DefaultRouteTable, "policy routing table that delivers captured packets locally")
	fs.IntVar(&f.rulePriority, "rule-priority", bpf.DefaultRulePriority, "priority of the policy routing rule")
	fs.DurationVar(&f.resync, "resync", agent.DefaultResync, "how often every local pod is re-checked even without changes")
	fs.DurationVar(&f.pollInterval, "config-poll", manifest.DefaultPoll, "how often the config file is re-checked besides change notifications")
	fs.DurationVar(&f.watchInterval, "datapath-check", bpf.DefaultWatchInterval, "how often the data path's kernel state (programs, pins) is checked and repaired besides routing change notifications")
	fs.UintVar(&f.passMark, "pass-mark", bpf.DefaultPassMark, "fwmark bit set on enrolled pods' packets that leave uncaptured (the uplink guard drops those without it)")
	addObserveFlags(fs, &f.observe)
	addPolicyFlags(fs, &f.policy)
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	usageErr := func(format string, args ...any) error {
		fmt.Fprintf(e.stderr, "mantlet agent: "+format+"\n", args...)
		fs.Usage()
		return errUsage
	}
	if fs.NArg() > 0 {
		return nil, usageErr("unexpected arguments %q", fs.Args())
	}
	if f.node == "" {
		return nil, usageErr("--node-name is required")
	}
	if f.cleanup {
		return f, nil
	}
	switch {
	case f.config == "":
		return nil, usageErr("--config is required")
	case f.caDir == "":
		return nil, usageErr("--ca-dir is required")
	case f.logFormat != "text" && f.logFormat != "json":
		return nil, usageErr("--log-format %q: want text or json", f.logFormat)
	}
	if _, err := manifest.ParseMTLSMode(f.mtlsMode); err != nil {
		return nil, usageErr("--mtls-mode: %v", err)
	}
	return f, nil
}

func (f *agentFlags) logger(e *env) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", f.logLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	if f.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(e.stderr, opts)), nil
	}
	return slog.New(slog.NewTextHandler(e.stderr, opts)), nil
}

// bpfConfig turns the flags into the data path's configuration.
func (f *agentFlags) bpfConfig(nodeIPs []netip.Addr) (bpf.Config, error) {
	cfg := bpf.DefaultConfig(f.node)
	if f.pinDir != "" {
		cfg.PinDir = filepath.Clean(f.pinDir)
	}
	cfg.ZtunnelMark = uint32(f.ztunnelMark)
	cfg.PassMark = uint32(f.passMark)
	cfg.RedirectMark = uint32(f.redirectMark)
	cfg.MarkMask = uint32(f.redirectMark)
	cfg.RouteTable = f.routeTable
	cfg.RulePriority = f.rulePriority
	cfg.NodeIPs = nodeIPs
	cfg.CaptureInboundPlain = f.inboundPlain
	cfg.CaptureLocalPlain = f.inboundPlain && f.localPlain
	for _, s := range f.excludeCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return cfg, fmt.Errorf("--exclude-cidr %q: want a prefix like 10.96.0.0/12", s)
		}
		cfg.ExcludeCIDRs = append(cfg.ExcludeCIDRs, p.Masked())
	}
	for _, s := range f.excludePorts {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return cfg, fmt.Errorf("--exclude-port %q: want a port from 1 to 65535", s)
		}
		cfg.ExcludePorts = append(cfg.ExcludePorts, uint16(n))
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

func runAgent(ctx context.Context, e *env, args []string) error {
	f, err := parseAgentFlags(e, args)
	if err != nil {
		return err
	}
	log, err := f.logger(e)
	if err != nil {
		return err
	}
	if err := requireRootAgent(); err != nil {
		return err
	}
	if f.cleanup {
		return cleanupAgent(ctx, f, log)
	}
	f.observe.stdout = e.stdout
	f.policy.stderr = e.stderr
	return runAgentWith(ctx, f, log)
}

// cleanupAgent removes the data path pinned for f's node and says what it
// found and did.
func cleanupAgent(ctx context.Context, f *agentFlags, log *slog.Logger) error {
	dir := f.pinDir
	if dir == "" {
		dir = bpf.DefaultConfig(f.node).PinDir
	}
	rep, err := bpf.Cleanup(ctx, filepath.Clean(dir))
	switch {
	case err != nil && rep.Found:
		log.Error("clean-up incomplete: "+rep.String(), "node", f.node, "detached", rep.Detached)
		return err
	case err != nil:
		return err
	case !rep.Found:
		log.Warn(rep.String(), "node", f.node)
	default:
		log.Info("cleaned up "+rep.String(), "node", f.node, "detached", rep.Detached)
	}
	return nil
}

// cleanupHint is the command that removes what an agent with f leaves
// pinned.
func (f *agentFlags) cleanupHint(pinDir string) string {
	return "mantlet agent --cleanup --node-name " + f.node + " --pin-dir " + pinDir
}

// runAgentWith runs the agent until ctx is done. It must run in the node's
// network namespace.
func runAgentWith(ctx context.Context, f *agentFlags, log *slog.Logger) error {
	// 1. Everything that can be checked without privileges comes first, so
	// a typo fails fast with a clear message.
	authority, err := ca.Load(f.caDir, ca.Options{})
	if err != nil {
		return err
	}
	td := authority.TrustDomain()
	if f.trustDomain != "" {
		want, err := spiffeid.TrustDomainFromString(f.trustDomain)
		if err != nil {
			return fmt.Errorf("--trust-domain %q: %w", f.trustDomain, err)
		}
		if want != td {
			return fmt.Errorf("--trust-domain %s: the CA in %s is for trust domain %s", want, f.caDir, td)
		}
	}
	mode, _ := manifest.ParseMTLSMode(f.mtlsMode)
	configPath, err := filepath.Abs(f.config)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	watcher := manifest.NewWatcher(configPath, log, manifest.WatchOptions{Poll: f.pollInterval,
		Options: manifest.Options{Kinds: enforce.ManifestKinds()}})
	first, err := watcher.Load()
	if err != nil {
		return err
	}
	en, err := newEnforcement(&f.policy, f.node, td, mode, log.With("component", "policy"))
	if err != nil {
		return err
	}
	en.apply(first, nil)
	nodeIPs, err := nodeAddrs(first.Snapshot, f.node, configPath)
	if err != nil {
		return err
	}
	if len(nodeIPs) == 0 {
		log.Warn("the config file has no Node of this name, only pods on it; its own addresses are taken from its interfaces only", "node", f.node, "file", configPath)
	}
	ifaceIPs, err := interfaceAddrs()
	if err != nil {
		return err
	}
	bpfCfg, err := f.bpfConfig(mergeAddrs(nodeIPs, ifaceIPs))
	if err != nil {
		return err
	}
	obsv, err := newObservability(&f.observe, filepath.Base(bpfCfg.PinDir), log.With("component", "admin"))
	if err != nil {
		return err
	}
	defer obsv.close()

	// 2. The data path: programs, maps, routing; adopted if pinned.
	dp, err := bpf.Open(ctx, bpfCfg, log.With("component", "bpf"))
	if err != nil {
		return err
	}
	defer dp.Close() // programs and maps stay pinned: traffic keeps its protection
	running := false
	defer func() {
		// A start that fails after Open leaves nothing it made behind; a
		// data path adopted from an earlier agent stays, as it protects
		// the pods that agent enrolled.
		if running || !dp.Created() {
			return
		}
		rep, err := dp.Remove(context.Background())
		if err != nil {
			log.Error("start failed; rolling back the data path failed too", "error", err, "remove_with", f.cleanupHint(bpfCfg.PinDir))
			return
		}
		log.Info("start failed; rolled the data path back: "+rep.String(), "node", f.node)
	}()
	uplinks := []string(f.uplinks)
	if len(uplinks) == 0 {
		if uplinks, err = agent.FindUplinks(nodeIPs); err != nil {
			return err
		}
	}
	for _, name := range uplinks {
		if err := dp.AttachUplink(name); err != nil {
			return err
		}
	}
	links, err := agent.NewRouteLinks()
	if err != nil {
		return err
	}
	defer links.Close()
	// Pods that turn STRICT lose their plaintext connections that
	// bypassed the ztunnel; the node's addresses (probes) keep theirs.
	plain, err := agent.NewPlainFlows(bpfCfg.NodeIPs)
	if err != nil {
		return err
	}
	defer plain.Close()

	// 3. The ztunnel's listeners, in the SOCKMAP.
	listen := func(addr string, slot bpf.Slot) (net.Listener, error) {
		ln, err := bpf.Listen(ctx, addr, bpfCfg.ZtunnelMark)
		if err != nil {
			return nil, fmt.Errorf("listen %s (%s): %w", addr, slot, err)
		}
		sc, ok := ln.(syscall.Conn)
		if !ok {
			ln.Close()
			return nil, fmt.Errorf("listen %s (%s): %T has no file descriptor", addr, slot, ln)
		}
		if err := dp.SetListener(slot, sc); err != nil {
			ln.Close()
			return nil, err
		}
		return ln, nil
	}
	zcfg := ztunnel.Config{NodeName: f.node, TrustDomain: td, Mark: int(bpfCfg.ZtunnelMark), Transparent: true,
		Logger: log.With("component", "ztunnel")}
	if zcfg.Outbound, err = listen(f.outboundAddr, bpf.Outbound); err != nil {
		return err
	}
	if zcfg.HBONE, err = listen(f.hboneAddr, bpf.HBONE); err != nil {
		zcfg.Outbound.Close()
		return err
	}
	if f.inboundPlain {
		if zcfg.InboundPlaintext, err = listen(f.inboundAddr, bpf.InboundPlain); err != nil {
			zcfg.Outbound.Close()
			zcfg.HBONE.Close()
			return err
		}
	}

	// 4. Identities, the ztunnel and the agent.
	ids := identity.NewManager(authority, td, log.With("component", "identity"), obsv.identityOptions(identity.ManagerOptions{TTL: f.svidTTL}))
	obsv.ids = ids
	store := workload.NewStore()
	zcfg.Store, zcfg.SVIDs, zcfg.Bundles = store, ids, ids
	obsv.ztunnelHooks(&zcfg)
	en.ztunnelHooks(&zcfg, f.node)
	zcfg.Authorizer = en.az
	proxy, err := ztunnel.New(zcfg)
	if err != nil {
		return err
	}
	ag, err := agent.New(agent.Config{
		Node: f.node, TrustDomain: td, DefaultMTLS: mode, MTLSMode: en.mtlsMode,
		Datapath: dp, Links: links, Identities: ids, Store: store, Plaintext: plain,
		Logger: log.With("component", "agent"), Resync: f.resync,
	})
	if err != nil {
		return err
	}
	ag.ApplyManifest(first)

	var servers []*http.Server
	if f.readyAddr != "" {
		servers = append(servers, &http.Server{Addr: f.readyAddr, Handler: ag.Handler(), ReadHeaderTimeout: 5 * time.Second})
	}
	if f.metricsAddr != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
			agent.NewCollector(ag, watcher, dp, func() map[string]uint64 {
				out := map[string]uint64{}
				for flag, n := range proxy.Counters() {
					out[flag.String()] = n
				}
				return out
			}))
		reg.MustRegister(obsv.collectors(proxy)...)
		reg.MustRegister(enforce.NewCollector(en.az, en.ev.Stats))
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		servers = append(servers, &http.Server{Addr: f.metricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second})
	}
	serverLns := make([]net.Listener, len(servers))
	for i, s := range servers {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		if serverLns[i], err = lc.Listen(ctx, "tcp", s.Addr); err != nil {
			for _, ln := range serverLns[:i] {
				ln.Close()
			}
			proxy.Close()
			return fmt.Errorf("listen %s: %w", s.Addr, err)
		}
	}

	// 5. Run until a signal, then drain.
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	fatal := make(chan error, 6+observeGoroutines+len(servers)) // one slot per goroutine below: none blocks
	var wg sync.WaitGroup
	goRun := func(name string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil {
				fatal <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	running = true
	goRun("identity", func() error { return ids.Run(runCtx) })
	goRun("data path watch", func() error { return dp.Watch(runCtx, f.watchInterval) })
	goRun("ztunnel", func() error { return proxy.Run(runCtx) })
	goRun("agent", func() error { return ag.Run(runCtx) })
	goRun("config watcher", func() error {
		return watcher.Run(runCtx, func(m *manifest.Manifest) {
			en.apply(m, proxy)
			ag.ApplyManifest(m)
		})
	})
	goRun("security events", func() error { return en.run(runCtx) })
	obsv.run(runCtx, goRun, proxy, admin.Config{Node: f.node, TrustDomain: td, Snapshot: store.Load, Ready: ag.Ready,
		Pods: ag.Pods, Datapath: dp, ConfigFile: watcher.ReloadStatus, Policy: en.eng, Policies: en.policies, Certificates: ids.Certificates, Logger: log.With("component", "admin")})
	for i, s := range servers {
		goRun("http "+s.Addr, func() error {
			if err := s.Serve(serverLns[i]); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	log.Info("agent running", "node", f.node, "trust_domain", td.Name(), "config", configPath,
		"pin_dir", bpfCfg.PinDir, "uplinks", uplinks, "outbound", zcfg.Outbound.Addr().String(), "hbone", zcfg.HBONE.Addr().String(),
		"ready", f.readyAddr, "metrics", f.metricsAddr, "admin", obsv.addrs(), "default_mtls", mode.String())

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down: draining connections", "timeout", f.drainTimeout)
	case runErr = <-fatal:
		log.Error("shutting down after a failure", "error", runErr)
	}
	ag.Drain()
	drainCtx, cancel := context.WithTimeout(context.Background(), f.drainTimeout)
	if err := proxy.Shutdown(drainCtx); err != nil {
		log.Warn("drain timed out; closing the remaining connections", "error", err)
	}
	cancel()
	for _, s := range servers {
		s.Close()
	}
	stop()
	wg.Wait()
	log.Info("agent stopped; programs and maps stay pinned so enrolled pods stay protected",
		"pin_dir", bpfCfg.PinDir, "remove_with", f.cleanupHint(bpfCfg.PinDir))
	return runErr
}

// nodeAddrs returns the addresses the cluster file gives the node named
// node. A name the file does not know at all (no Node object, no pod
// scheduled there) is an error naming the nodes it has: a typo must fail
// before anything is loaded into the kernel.
func nodeAddrs(snap *workload.Snapshot, node, file string) ([]netip.Addr, error) {
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
		return nil, fmt.Errorf("--node-name %s: %s names no nodes (no Node objects, no pods with spec.nodeName); add a Node named %s", node, file, node)
	}
	slices.Sort(names)
	return nil, fmt.Errorf("--node-name %s: %s has no node of this name; its nodes are %s", node, file, strings.Join(names, ", "))
}

// interfaceAddrs returns the addresses of the network namespace's
// interfaces: the node's own addresses.
func interfaceAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("node addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr())
		}
	}
	return out, nil
}

// mergeAddrs returns the IPv4 addresses of a and b, without duplicates or
// loopback addresses.
func mergeAddrs(a, b []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, ip := range slices.Concat(a, b) {
		ip = ip.Unmap()
		if ip.Is4() && !ip.IsLoopback() && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	return out
}

var _ flag.Value = (*listFlag)(nil)
