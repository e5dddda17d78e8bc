package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/agent/manifest"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/enforce"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/ztunnel"
)

// policyFlags are the agent's flags for policy enforcement.
type policyFlags struct {
	rootNamespace  string
	defaultDeny    bool
	securityEvents string
	eventsRate     float64
	noPreCheck     bool

	stderr io.Writer // where --security-events - writes
}

func addPolicyFlags(fs *flag.FlagSet, p *policyFlags) {
	fs.StringVar(&p.rootNamespace, "mesh-root-namespace", policy.DefaultRootNamespace, "namespace whose MeshPolicies apply to every namespace")
	fs.BoolVar(&p.defaultDeny, "default-deny", false, "refuse connections to a workload that no ALLOW MeshPolicy admits (mesh-wide default deny)")
	fs.StringVar(&p.securityEvents, "security-events", "-", "where to write security events (refusals, connections cut by a policy change, AUDIT hits), one JSON line each: - for stderr, or a file (appended)")
	fs.Float64Var(&p.eventsRate, "security-events-rate", 1000, "security events per second at most (bursts of twice as many); the rest are counted in a summary line")
	fs.BoolVar(&p.noPreCheck, "no-policy-precheck", false, "do not check policy at the source before tunnelling (the destination always decides)")
}

// enforcement is the agent's policy engine, the ztunnel's Authorizer over
// it, and the security event writer.
type enforcement struct {
	eng   *policy.Engine
	az    *enforce.Authorizer
	ev    *events.Writer
	evOut io.WriteCloser
	log   *slog.Logger
	mu    sync.Mutex
	inSet []*v1alpha1.MeshPolicy // the set in force
}

// newEnforcement opens the security event output and makes the engine;
// defaultMTLS is --mtls-mode.
func newEnforcement(pf *policyFlags, node string, td spiffeid.TrustDomain, defaultMTLS manifest.MTLSMode, log *slog.Logger) (*enforcement, error) {
	var out io.WriteCloser
	if pf.securityEvents == "-" {
		out = nopWriteCloser{pf.stderr}
	} else {
		var err error
		if out, err = events.OpenFile(pf.securityEvents); err != nil {
			return nil, fmt.Errorf("--security-events: %w", err)
		}
	}
	if pf.eventsRate <= 0 {
		out.Close()
		return nil, fmt.Errorf("--security-events-rate %v: want a positive number", pf.eventsRate)
	}
	mode := v1alpha1.MTLSPermissive
	if defaultMTLS == manifest.MTLSStrict {
		mode = v1alpha1.MTLSStrict
	}
	en := &enforcement{log: log, evOut: out}
	en.eng = policy.NewEngine(policy.Options{RootNamespace: pf.rootNamespace, TrustDomain: td, DefaultDeny: pf.defaultDeny,
		DefaultMTLS: mode, Logger: log})
	en.ev = events.NewWriter(out, events.WriterOptions{Rate: pf.eventsRate, Logger: log})
	en.az = enforce.New(en.eng, enforce.Options{Node: node, TrustDomain: td, Events: en.ev, Logger: log, NoPreCheck: pf.noPreCheck})
	return en, nil
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// apply puts a new cluster file in force: workloads first, then the
// policy set (all-or-nothing: on error the previous set stays and the
// error names the policy and field), then every open flow of flows (nil
// before the ztunnel runs) is decided again.
func (en *enforcement) apply(m *manifest.Manifest, flows enforce.FlowSource) {
	en.eng.SetWorkloads(m.Snapshot)
	set := enforce.Policies(m)
	if err := en.eng.Update(set); err != nil {
		en.log.Error("policy: the file's policies are rejected; the previous set stays in force", "file", m.File, "error", err)
	} else {
		en.mu.Lock()
		en.inSet = set
		en.mu.Unlock()
	}
	if flows != nil {
		if n := en.az.Reevaluate(flows, m.Snapshot); n > 0 {
			en.log.Info("policy: open connections re-evaluated", "closed", n, "generation", en.eng.Generation())
		}
	}
}

// policies returns the set in force (for the admin API).
func (en *enforcement) policies() []*v1alpha1.MeshPolicy {
	en.mu.Lock()
	defer en.mu.Unlock()
	return en.inSet
}

// mtlsMode is the agent's per-pod mode: the engine's, which includes
// the annotations and --mtls-mode.
func (en *enforcement) mtlsMode(w *workload.Workload) manifest.MTLSMode {
	if en.eng.MTLSMode(w) == v1alpha1.MTLSStrict {
		return manifest.MTLSStrict
	}
	return manifest.MTLSPermissive
}

// Reasons of the protocol events (events.StageProtocol).
const (
	reasonRapidReset = "rapid-reset"
	reasonFrameFlood = "frame-flood"
)

// ztunnelHooks makes the ztunnel's refusals of abusive HBONE clients
// (rapid reset, frame floods: a peer with a valid certificate whose
// connection was closed) security events.
func (en *enforcement) ztunnelHooks(cfg *ztunnel.Config, node string) {
	cfg.OnReject = func(r *ztunnel.Rejection) {
		var reason string
		switch r.Flag {
		case ztunnel.FlagRapidReset:
			reason = reasonRapidReset
		case ztunnel.FlagFrameFlood:
			reason = reasonFrameFlood
		default:
			return
		}
		e := events.Event{Time: r.Time, Verdict: events.Deny, Stage: events.StageProtocol, Reason: reason,
			Flag: r.Flag.String(), Rule: -1, Node: node, Direction: string(ztunnel.Inbound), MTLS: true, Src: r.Src, Dst: r.Dst}
		if !r.SrcID.IsZero() {
			e.SrcID = r.SrcID.String()
		}
		en.ev.Emit(&e)
	}
}

// run writes security events until ctx ends.
func (en *enforcement) run(ctx context.Context) error {
	err := en.ev.Run(ctx)
	if cerr := en.evOut.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("--security-events: close: %w", cerr)
	}
	return err
}
