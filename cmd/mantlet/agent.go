package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/node"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/source/file"
	"github.com/mantlet/mantlet/source/kubernetes"
	"github.com/mantlet/mantlet/telemetry"
)

func init() {
	register(command{name: "agent", summary: "run the node agent and its ztunnel (standalone: workloads from a file)", run: runAgent})
}

// agentFlags are the flags of 'mantlet agent'. The names are a contract
// with users and their scripts: add, never rename.
type agentFlags struct {
	node          string
	config        string
	kubeconfig    string
	inCluster     bool
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
	svidSpread    time.Duration
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
	observe       node.ObserveConfig // metrics, access log, admin API
	policy        node.PolicyConfig  // policy enforcement, security events
	limits        node.LimitsConfig  // the ztunnel's accept path (agent_limits.go)
	issuer        issuerFlags        // who signs the SVIDs (agent_issuer.go)
	cni           cniFlags           // mantlet's CNI plugin (agent_cni.go)
	federate      listFlag           // <trust-domain>=<bundle file>, repeatable
	federatePoll  time.Duration
	memProfile    int // runtime.MemProfileRate, unless GODEBUG sets it
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
	fs := newFlagSet(e, "agent", "--node-name N (--config cluster.yaml | --kubeconfig F | --kubernetes) (--ca-dir D | --issuer cluster-ca --ca-address A --ca-bundle B | --issuer spire --spire-admin-socket S) [flags]\n       mantlet agent --cleanup --node-name N [--pin-dir D]")
	fs.StringVar(&f.node, "node-name", "", "name of this node, as pods' spec.nodeName say (required)")
	fs.StringVar(&f.config, "config", "", "cluster file: multi-document YAML of Kubernetes Namespace, Pod, Node, Service and MeshPolicy objects, watched for changes (standalone mode; one of --config, --kubeconfig or --kubernetes is required)")
	fs.StringVar(&f.caDir, "ca-dir", "", "directory of the CA made by 'mantlet ca init' (required with --issuer ca, the default)")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "Kubernetes mode: read the cluster from the API server of this kubeconfig (instead of --config)")
	fs.BoolVar(&f.inCluster, "kubernetes", false, "Kubernetes mode: read the cluster from the API server, with the pod's service account (in a DaemonSet; instead of --config)")
	fs.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of the identities (default: the CA's; with --issuer cluster-ca, "+identity.DefaultTrustDomain.Name()+"; with --issuer spire, the SPIRE agent's)")
	fs.StringVar(&f.pinDir, "pin-dir", "", "bpffs directory of this node's pinned programs and maps (default "+bpf.DefaultPinRoot+"/<node-name>)")
	fs.BoolVar(&f.cleanup, "cleanup", false, "detach every program and remove the pins of this node (with --pin-dir if the agent ran with one), and the routing rule and route unless another data path of the namespace uses them, then exit")
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
	fs.DurationVar(&f.svidSpread, "svid-reissue-spread", identity.DefaultReissueSpread, "once a root rotation is activated, renew the certificates held under the old root within this time (each at a random moment)")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", 10*time.Second, "on SIGTERM, how long open connections may take to finish")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format on stderr: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.IntVar(&f.memProfile, "memory-profile-rate", 0, "sample one allocation per this many `bytes` for the heap and allocs profiles of the admin API (Go's default: 524288); 0 leaves them empty: each sample's call stack is recorded for good (docs/observability.md)")
	fs.UintVar(&f.ztunnelMark, "ztunnel-mark", bpf.DefaultZtunnelMark, "SO_MARK of the ztunnel's sockets")
	fs.UintVar(&f.redirectMark, "redirect-mark", bpf.DefaultRedirectMark, "fwmark of captured packets (also the mask of the routing rule)")
	fs.IntVar(&f.routeTable, "route-table", bpf.DefaultRouteTable, "policy routing table that delivers captured packets locally")
	fs.IntVar(&f.rulePriority, "rule-priority", bpf.DefaultRulePriority, "priority of the policy routing rule")
	fs.DurationVar(&f.resync, "resync", agent.DefaultResync, "how often every local pod is re-checked even without changes")
	fs.DurationVar(&f.pollInterval, "config-poll", file.DefaultPoll, "how often the config file is re-checked besides change notifications")
	fs.DurationVar(&f.watchInterval, "datapath-check", bpf.DefaultWatchInterval, "how often the data path's kernel state (programs, pins) is checked and repaired besides routing change notifications")
	fs.Var(&f.federate, "federate", "trust a foreign trust domain: `trust-domain=file` of its bundle (PEM root certificates or a SPIFFE bundle); its workloads' certificates must chain to it, and it vouches for IDs of that domain only (repeat or comma-separate; see docs/identity.md)")
	fs.DurationVar(&f.federatePoll, "federate-poll", identity.DefaultFederationPoll, "how often the --federate bundle files are checked for changes (re-read only when changed)")
	fs.UintVar(&f.passMark, "pass-mark", bpf.DefaultPassMark, "fwmark bit set on enrolled pods' packets that leave uncaptured (the uplink guard drops those without it)")
	addObserveFlags(fs, &f.observe)
	addPolicyFlags(fs, &f.policy)
	addLimitFlags(fs, &f.limits)
	addIssuerFlags(fs, &f.issuer)
	addCNIFlags(fs, &f.cni)
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
	sources := 0
	for _, on := range []bool{f.config != "", f.kubeconfig != "", f.inCluster} {
		if on {
			sources++
		}
	}
	switch {
	case sources == 0:
		return nil, usageErr("--config (standalone), --kubeconfig or --kubernetes is required")
	case sources > 1:
		return nil, usageErr("give one of --config, --kubeconfig and --kubernetes")
	case f.checkIssuer(fs) != "":
		return nil, usageErr("%s", f.checkIssuer(fs))
	case f.logFormat != "text" && f.logFormat != "json":
		return nil, usageErr("--log-format %q: want text or json", f.logFormat)
	case f.memProfile < 0:
		return nil, usageErr("--memory-profile-rate %d: want 0 (off) or a number of bytes", f.memProfile)
	}
	if _, err := v1alpha1.ParseMTLSMode(f.mtlsMode); err != nil {
		return nil, usageErr("--mtls-mode: %v", err)
	}
	if err := checkLimits(&f.limits); err != nil {
		return nil, usageErr("%v", err)
	}
	if err := f.cni.check(f.kubeconfig != "" || f.inCluster); err != nil {
		return nil, usageErr("%v", err)
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
func (f *agentFlags) bpfConfig() (bpf.Config, error) {
	cfg := bpf.DefaultConfig(f.node)
	cfg.PinDir = f.pinDirOrDefault()
	cfg.ZtunnelMark = uint32(f.ztunnelMark)
	cfg.PassMark = uint32(f.passMark)
	cfg.RedirectMark = uint32(f.redirectMark)
	cfg.MarkMask = uint32(f.redirectMark)
	cfg.RouteTable = f.routeTable
	cfg.RulePriority = f.rulePriority
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

// agentGCPercent is the agent's GOGC unless the environment sets one.
// Most of an agent's heap is the cluster's state, which a change replaces
// as a whole: with Go's default (100) the heap doubles that state between
// collections; at 50 it grows by half, which keeps an agent of a
// 10,000-pod cluster under 100 MB resident for a few percent of a core
// more while the cluster changes (docs/performance.md).
const agentGCPercent = 50

// memProfileRate is the rate the agent's heap profiler samples at: flag,
// unless godebug (the GODEBUG variable) sets memprofilerate, which the
// runtime has applied already (ok false).
func memProfileRate(godebug string, flag int) (rate int, ok bool) {
	for _, kv := range strings.Split(godebug, ",") {
		if strings.HasPrefix(strings.TrimSpace(kv), "memprofilerate=") {
			return 0, false
		}
	}
	return flag, true
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
	if e.getenv("GOGC") == "" {
		debug.SetGCPercent(agentGCPercent)
	}
	if rate, ok := memProfileRate(e.getenv("GODEBUG"), f.memProfile); ok {
		runtime.MemProfileRate = rate
	}
	f.observe.Stdout = e.stdout
	f.policy.Stderr = e.stderr
	cfg, err := f.nodeConfig(ctx, log)
	if err != nil {
		return err
	}
	if c, ok := cfg.Issuer.(io.Closer); ok {
		defer c.Close() // SPIRE's subscriptions
	}
	return node.Run(ctx, cfg)
}

// cleanupAgent removes the data path pinned for f's node, and the admin
// socket that a crashed agent left, and says what it found and did.
func cleanupAgent(ctx context.Context, f *agentFlags, log *slog.Logger) error {
	dir := f.pinDir
	if dir == "" {
		dir = bpf.DefaultConfig(f.node).PinDir
	}
	rep, err := bpf.Cleanup(ctx, filepath.Clean(dir))
	// An agent that crashed also left its admin socket; one that a live
	// agent serves stays.
	if f.observe.AdminSocket != "" {
		sock := strings.ReplaceAll(f.observe.AdminSocket, node.NodePlaceholder, filepath.Base(filepath.Clean(dir)))
		removed, serr := admin.RemoveStaleSocket(sock)
		switch {
		case serr != nil:
			log.Warn("admin socket left in place", "error", serr)
		case removed:
			log.Info("removed the stale admin socket "+sock, "node", f.node)
		}
	}
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

// pinDirOrDefault is --pin-dir, or the node's default pin directory.
func (f *agentFlags) pinDirOrDefault() string {
	if f.pinDir != "" {
		return filepath.Clean(f.pinDir)
	}
	return bpf.DefaultConfig(f.node).PinDir
}

// nodeConfig turns the flags into the node's configuration. Everything
// that can be checked without privileges (the CA, the trust domain, the
// exclusions, the marks) is checked here, so a typo fails at once.
func (f *agentFlags) nodeConfig(ctx context.Context, log *slog.Logger) (node.Config, error) {
	mode, _ := v1alpha1.ParseMTLSMode(f.mtlsMode)
	src, rc, err := f.source(log)
	if err != nil {
		return node.Config{}, err
	}
	cniCfg, err := f.cni.config(rc)
	if err != nil {
		return node.Config{}, err
	}
	bcfg, err := f.bpfConfig()
	if err != nil {
		return node.Config{}, err
	}
	var fed []identity.FederatedBundle
	for _, v := range f.federate {
		fb, err := identity.ParseFederatedBundle(v)
		if err != nil {
			return node.Config{}, fmt.Errorf("agent: --%w", err)
		}
		fed = append(fed, fb)
	}
	// Last: SPIRE's may wait for the SPIRE agent.
	issuer, td, err := f.newIssuer(ctx, log)
	if err != nil {
		return node.Config{}, err
	}
	cfg := node.Config{
		Node: f.node, Issuer: issuer, TrustDomain: td, DefaultMTLS: mode,
		Federation: fed, FederationPoll: f.federatePoll,
		Source:   src,
		Datapath: bcfg, Uplinks: f.uplinks,
		OutboundAddr: f.outboundAddr, HBONEAddr: f.hboneAddr,
		ReadyAddr: f.readyAddr, MetricsAddr: f.metricsAddr,
		SVIDTTL: f.svidTTL, SVIDReissueSpread: f.svidSpread, DrainTimeout: f.drainTimeout, Resync: f.resync, WatchInterval: f.watchInterval,
		Observe: f.observe, Policy: f.policy, Limits: f.limits,
		CleanupHint: f.cleanupHint(bcfg.PinDir),
		Logger:      log,
		CNI:         cniCfg,
	}
	if f.inboundPlain {
		cfg.InboundPlainAddr = f.inboundAddr
	}
	return cfg, nil
}

// source is where the node reads the cluster: the file of --config, or
// the API server of --kubeconfig or of the pod (--kubernetes), with the
// API server's configuration then.
func (f *agentFlags) source(log *slog.Logger) (source.Source, *rest.Config, error) {
	if f.config != "" {
		path, err := filepath.Abs(f.config)
		if err != nil {
			return nil, nil, fmt.Errorf("--config: %w", err)
		}
		return file.New(path, log, file.WatchOptions{Poll: f.pollInterval}), nil, nil
	}
	var (
		rc   *rest.Config
		err  error
		flag = "--kubernetes"
	)
	if f.kubeconfig != "" {
		flag = "--kubeconfig " + f.kubeconfig
		rc, err = clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", flag, err)
	}
	rc.UserAgent = "mantlet-agent/" + f.node
	src, err := kubernetes.New(rc, kubernetes.Options{Logger: log.With("component", "kubernetes")})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", flag, err)
	}
	return src, rc, nil
}

func addObserveFlags(fs *flag.FlagSet, o *node.ObserveConfig) {
	fs.StringVar(&o.AdminAddr, "admin-addr", admin.DefaultAddr, "listen address of the admin API (keep it on localhost); empty disables it")
	fs.StringVar(&o.AdminSocket, "admin-socket", admin.SocketPath(node.NodePlaceholder), "unix socket of the admin API ("+node.NodePlaceholder+": the last element of --pin-dir, by default the node name); empty disables it")
	fs.StringVar(&o.AccessLog, "access-log", "-", "where to write the access log, one JSON line per connection: - for stdout, or a file (appended); empty disables it")
	fs.BoolVar(&o.AccessLogOpens, "access-log-open", false, "also write an access log line when a connection opens")
	fs.Float64Var(&o.AccessLogRate, "access-log-rate", 1000, "access log lines per second at most (bursts of twice as many); the rest are dropped and counted")
	fs.IntVar(&o.FlowLogSize, "flow-log-size", telemetry.DefaultFlowLogSize, "recent flows kept for 'mantlet flows'")
	fs.DurationVar(&o.FlushEvery, "metrics-flush", telemetry.DefaultFlushInterval, "how often the bytes of open connections are added to the byte metrics")
}

func addPolicyFlags(fs *flag.FlagSet, p *node.PolicyConfig) {
	fs.StringVar(&p.RootNamespace, "mesh-root-namespace", policy.DefaultRootNamespace, "namespace whose MeshPolicies apply to every namespace")
	fs.BoolVar(&p.DefaultDeny, "default-deny", false, "refuse connections to a workload that no ALLOW MeshPolicy admits (mesh-wide default deny)")
	fs.StringVar(&p.SecurityEvents, "security-events", "-", "where to write security events (refusals, connections cut by a policy change, AUDIT hits), one JSON line each: - for stderr, or a file (appended)")
	fs.Float64Var(&p.EventsRate, "security-events-rate", 1000, "security events per second at most (bursts of twice as many); the rest are counted in a summary line")
	fs.BoolVar(&p.NoPreCheck, "no-policy-precheck", false, "do not check policy at the source before tunnelling (the destination always decides)")
}

var _ flag.Value = (*listFlag)(nil)
