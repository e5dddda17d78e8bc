package node

import (
	"context"
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
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/telemetry"
	"github.com/mantlet/mantlet/ztunnel"
)

// ObserveConfig configures metrics' helpers, the access log, the flow log
// and the admin API.
type ObserveConfig struct {
	// AdminAddr is the admin API's TCP address (keep it on localhost);
	// empty disables it.
	AdminAddr string
	// AdminSocket is the admin API's unix socket; NodePlaceholder in it
	// stands for the node's instance name (Config.Instance). Empty
	// disables it.
	AdminSocket string
	// AccessLog is where the access log goes: "-" for Stdout, a file
	// (appended), or empty for none.
	AccessLog string
	// AccessLogOpens also writes a line when a connection opens.
	AccessLogOpens bool
	// AccessLogRate is the most lines per second (bursts of twice as
	// many); the rest are dropped and counted.
	AccessLogRate float64
	// FlowLogSize is how many recent flows 'mantlet flows' sees.
	FlowLogSize int
	// FlushEvery is how often open connections' bytes reach the metrics.
	FlushEvery time.Duration
	// Stdout receives the access log with AccessLog "-".
	Stdout io.Writer
}

// NodePlaceholder in ObserveConfig.AdminSocket stands for the node's
// instance name: the last element of the pin directory, which is the node
// name unless the pin directory says otherwise (so two agents for nodes of
// the same name, in two testbeds, get two sockets).
const NodePlaceholder = "<node>"

// observability is the agent's telemetry and admin API.
type observability struct {
	cfg      *ObserveConfig
	log      *slog.Logger
	observer *telemetry.Observer
	flows    *telemetry.FlowLog
	access   *events.Writer
	certs    *telemetry.Certificates
	closeLog io.Closer
	adminLns []net.Listener
	listenOn []string
	sockDir  string            // removed at close when empty
	ids      *identity.Manager // set by the agent once made
}

// newObservability opens the access log and the admin API's listeners, so
// mistakes (a busy port, an unwritable file) fail the start. node names
// the node in the access log; instance replaces the placeholder of
// --admin-socket.
func newObservability(of *ObserveConfig, node, instance string, log *slog.Logger) (*observability, error) {
	if of.FlowLogSize <= 0 {
		return nil, fmt.Errorf("flow log size %d: want a positive number", of.FlowLogSize)
	}
	o := &observability{cfg: of, log: log, flows: telemetry.NewFlowLog(of.FlowLogSize)}
	if of.AccessLog != "" {
		out, err := openOutput(of.AccessLog, of.Stdout, 0o640)
		if err != nil {
			return nil, fmt.Errorf("access log: %w", err)
		}
		o.closeLog = out
		o.access = events.NewWriter(out, events.WriterOptions{Name: "access_log", Node: node, Rate: of.AccessLogRate, Logger: log})
	}
	o.observer = telemetry.NewObserver(telemetry.ObserverOptions{AccessLog: o.access, LogOpens: of.AccessLogOpens, Flows: o.flows})
	o.certs = telemetry.NewCertificates(func() []identity.CertInfo {
		if o.ids == nil {
			return nil
		}
		return o.ids.Certificates()
	}, nil)
	if of.AdminAddr != "" {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", of.AdminAddr)
		if err != nil {
			o.close()
			return nil, fmt.Errorf("admin API on %s: %w", of.AdminAddr, err)
		}
		o.adminLns = append(o.adminLns, ln)
		o.listenOn = append(o.listenOn, ln.Addr().String())
	}
	if of.AdminSocket != "" {
		path := strings.ReplaceAll(of.AdminSocket, NodePlaceholder, instance)
		ln, err := admin.ListenUnix(path)
		if err != nil {
			o.close()
			return nil, fmt.Errorf("admin API on %s: %w", path, err)
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

// run starts the byte flusher, the access log writer and the admin API in
// g; each ends with ctx.
func (o *observability) run(ctx context.Context, g *group, p *ztunnel.Proxy, cfg admin.Config) {
	goRun := g.run
	goRun("metrics flush", func() error { return o.observer.RunFlush(ctx, o.cfg.FlushEvery, p) })
	if o.access != nil {
		goRun("access log", func() error {
			o.access.Run(ctx)
			return nil
		})
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

// openOutput opens where a stream of JSON lines goes: "-" is dash (which
// Close leaves open), anything else a file, appended to (made with perm).
func openOutput(path string, dash io.Writer, perm os.FileMode) (io.WriteCloser, error) {
	if path == "-" {
		return nopCloser{dash}, nil
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, perm)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

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
