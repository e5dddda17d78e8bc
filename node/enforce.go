package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/enforce"
	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/ztunnel"
)

// PolicyConfig configures policy enforcement and security events.
type PolicyConfig struct {
	// RootNamespace holds the mesh-wide MeshPolicies.
	RootNamespace string
	// DefaultDeny refuses connections to a workload no ALLOW admits.
	DefaultDeny bool
	// SecurityEvents is where security events go, one JSON line each: "-"
	// for Stderr, or a file (appended).
	SecurityEvents string
	// EventsRate is the most events per second (bursts of twice as many);
	// the rest are counted in a summary line.
	EventsRate float64
	// NoPreCheck skips the policy check at the source (the destination
	// always decides).
	NoPreCheck bool
	// Stderr receives the events with SecurityEvents "-".
	Stderr io.Writer
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

	closeOnce sync.Once
}

// newEnforcement opens the security event output and makes the engine;
// defaultMTLS is --mtls-mode.
func newEnforcement(pf *PolicyConfig, node string, td spiffeid.TrustDomain, defaultMTLS v1alpha1.MTLSMode, log *slog.Logger) (*enforcement, error) {
	var out io.WriteCloser
	if pf.SecurityEvents == "-" {
		out = nopWriteCloser{pf.Stderr}
	} else {
		var err error
		if out, err = events.OpenFile(pf.SecurityEvents); err != nil {
			return nil, fmt.Errorf("security events: %w", err)
		}
	}
	if pf.EventsRate <= 0 {
		out.Close()
		return nil, fmt.Errorf("security events rate %v: want a positive number", pf.EventsRate)
	}
	mode := defaultMTLS
	if mode == v1alpha1.MTLSUnset {
		mode = v1alpha1.MTLSPermissive
	}
	en := &enforcement{log: log, evOut: out}
	en.eng = policy.NewEngine(policy.Options{RootNamespace: pf.RootNamespace, TrustDomain: td, DefaultDeny: pf.DefaultDeny,
		DefaultMTLS: mode, Logger: log})
	en.ev = events.NewWriter(out, events.WriterOptions{Rate: pf.EventsRate, Logger: log})
	en.az = enforce.New(en.eng, enforce.Options{Node: node, TrustDomain: td, Events: en.ev, Logger: log, NoPreCheck: pf.NoPreCheck})
	return en, nil
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// apply puts the engine's part of a new state in force: the workloads and
// the policy set together (all-or-nothing: on error the previous state
// stays in force and the error says why).
func (en *enforcement) apply(st *source.State) error {
	if err := en.eng.Apply(st.Snapshot, st.Policies); err != nil {
		return err
	}
	en.mu.Lock()
	en.inSet = st.Policies
	en.mu.Unlock()
	return nil
}

// reevaluate decides every open flow of flows again against snap and the
// policy set in force, closing those now refused.
func (en *enforcement) reevaluate(flows enforce.FlowSource, snap *workload.Snapshot) {
	if n := en.az.Reevaluate(flows, snap); n > 0 {
		en.log.Info("policy: open connections re-evaluated", "closed", n, "generation", en.eng.Generation())
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
func (en *enforcement) mtlsMode(w *workload.Workload) v1alpha1.MTLSMode { return en.eng.MTLSMode(w) }

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

// close releases the event output when run never ran.
func (en *enforcement) close() {
	en.closeOnce.Do(func() { en.evOut.Close() })
}

// run writes security events until ctx ends.
func (en *enforcement) run(ctx context.Context) error {
	err := en.ev.Run(ctx)
	var cerr error
	en.closeOnce.Do(func() { cerr = en.evOut.Close() })
	if err == nil && cerr != nil {
		err = fmt.Errorf("security events: close: %w", cerr)
	}
	return err
}
