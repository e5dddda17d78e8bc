package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/telemetry"
	"github.com/mantlet/mantlet/ztunnel"
)

// observeFlags are the agent's flags for metrics, logs and the admin API.
type observeFlags struct {
	adminAddr      string
	adminSocket    string
	accessLog      string
	accessLogOpens bool
	accessLogRate  float64
	flowLogSize    int
	flushEvery     time.Duration

	stdout io.Writer // where --access-log - writes
}

// nodePlaceholder in --admin-socket stands for the node's instance name:
// the last element of --pin-dir, which is the node name unless --pin-dir
// says otherwise (so two agents for nodes of the same name, in two
// testbeds, get two sockets).
const nodePlaceholder = "<node>"

func addObserveFlags(fs *flag.FlagSet, o *observeFlags) {
	fs.StringVar(&o.adminAddr, "admin-addr", admin.DefaultAddr, "listen address of the admin API (keep it on localhost); empty disables it")
	fs.StringVar(&o.adminSocket, "admin-socket", admin.SocketPath(nodePlaceholder), "unix socket of the admin API ("+nodePlaceholder+": the last element of --pin-dir, by default the node name); empty disables it")
	fs.StringVar(&o.accessLog, "access-log", "-", "where to write the access log, one JSON line per connection: - for stdout, or a file (appended); empty disables it")
	fs.BoolVar(&o.accessLogOpens, "access-log-open", false, "also write an access log line when a connection opens")
	fs.Float64Var(&o.accessLogRate, "access-log-rate", 1000, "access log lines per second at most (bursts of twice as many); the rest are dropped and counted")
	fs.IntVar(&o.flowLogSize, "flow-log-size", telemetry.DefaultFlowLogSize, "recent flows kept for 'mantlet flows'")
	fs.DurationVar(&o.flushEvery, "metrics-flush", telemetry.DefaultFlushInterval, "how often the bytes of open connections are added to the byte metrics")
}

// observability is the agent's telemetry and admin API.
type observability struct {
	flags    *observeFlags
	log      *slog.Logger
	observer *telemetry.Observer
	flows    *telemetry.FlowLog
	access   *telemetry.AccessLog
	certs    *telemetry.Certificates
	closeLog io.Closer
	adminLns []net.Listener
	listenOn []string
	sockDir  string            // removed at close when empty
	ids      *identity.Manager // set by the agent once made
}

// newObservability opens the access log and the admin API's listeners, so
// mistakes (a busy port, an unwritable file) fail the start. node replaces
// the placeholder of --admin-socket.
func newObservability(of *observeFlags, node string, log *slog.Logger) (*observability, error) {
	if of.flowLogSize <= 0 {
		return nil, fmt.Errorf("--flow-log-size %d: want a positive number", of.flowLogSize)
	}
	o := &observability{flags: of, log: log, flows: telemetry.NewFlowLog(of.flowLogSize)}
	switch of.accessLog {
	case "":
	case "-":
		o.access = telemetry.NewAccessLog(of.stdout, telemetry.AccessLogOptions{Rate: of.accessLogRate})
	default:
		f, err := os.OpenFile(of.accessLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, fmt.Errorf("--access-log: %w", err)
		}
		o.closeLog = f
		o.access = telemetry.NewAccessLog(f, telemetry.AccessLogOptions{Rate: of.accessLogRate})
	}
	o.observer = telemetry.NewObserver(telemetry.ObserverOptions{AccessLog: o.access, LogOpens: of.accessLogOpens, Flows: o.flows})
	o.certs = telemetry.NewCertificates(func() []identity.CertInfo {
		if o.ids == nil {
			return nil
		}
		return o.ids.Certificates()
	}, nil)
	if of.adminAddr != "" {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", of.adminAddr)
		if err != nil {
			o.close()
			return nil, fmt.Errorf("--admin-addr: %w", err)
		}
		o.adminLns = append(o.adminLns, ln)
		o.listenOn = append(o.listenOn, ln.Addr().String())
	}
	if of.adminSocket != "" {
		path := strings.ReplaceAll(of.adminSocket, nodePlaceholder, node)
		ln, err := admin.ListenUnix(path)
		if err != nil {
			o.close()
			return nil, fmt.Errorf("--admin-socket: %w", err)
		}
		o.adminLns = append(o.adminLns, ln)
		o.listenOn = append(o.listenOn, path)
		o.sockDir = filepath.Dir(path)
	}
	return o, nil
}

// identityOptions hooks the certificate metrics to the SVID manager.
func (o *observability) identityOptions(opts identity.ManagerOptions) identity.ManagerOptions {
	opts.OnIssue = o.certs.OnIssue
	return opts
}

// ztunnelHooks hooks metrics, access log and flow log to the ztunnel.
func (o *observability) ztunnelHooks(cfg *ztunnel.Config) {
	cfg.OnFlowOpen = o.observer.FlowOpened
	cfg.OnFlowEnd = o.observer.FlowEnded
}

// collectors are the metrics to register next to the agent's.
func (o *observability) collectors(p *ztunnel.Proxy) []prometheus.Collector {
	return append(o.observer.Collectors(), o.certs, telemetry.NewPoolCollector(p), telemetry.BuildInfo())
}

// addrs names where the admin API listens, for the start-up log line.
func (o *observability) addrs() []string { return o.listenOn }

// run starts the byte flusher, the access log writer and the admin API;
// each ends with ctx.
func (o *observability) run(ctx context.Context, goRun func(string, func() error), p *ztunnel.Proxy, cfg admin.Config) {
	goRun("metrics flush", func() error { return o.observer.RunFlush(ctx, o.flags.flushEvery, p) })
	if o.access != nil {
		goRun("access log", func() error { return o.access.Run(ctx) })
	}
	if len(o.adminLns) == 0 {
		return
	}
	cfg.Flows = o.flows
	cfg.OpenFlows = p.NumOpenFlows
	if cfg.Certificates == nil && o.ids != nil {
		cfg.Certificates = o.ids.Certificates
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		cfg.Version = bi.Main.Version
	}
	lns := o.adminLns
	o.adminLns = nil // Serve closes them
	goRun("admin API", func() error {
		srv, err := admin.NewServer(cfg)
		if err != nil {
			return err
		}
		return srv.Serve(ctx, lns...)
	})
}

// goroutines is how many goroutines run may start.
const observeGoroutines = 3

// close releases what newObservability opened and run did not take.
func (o *observability) close() {
	for _, ln := range o.adminLns {
		ln.Close()
	}
	o.adminLns = nil
	if o.closeLog != nil {
		o.closeLog.Close()
	}
	if o.sockDir != "" {
		os.Remove(o.sockDir) // only when empty: the socket is gone once its listener closed
	}
}
