package node

import (
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
	evOut io.Closer
	log   *slog.Logger
	mu    sync.Mutex
	inSet []*v1alpha1.MeshPolicy // the set in force
}

// newEnforcement opens the security event output and makes the engine;
// defaultMTLS is --mtls-mode.
func newEnforcement(pf *PolicyConfig, node string, td spiffeid.TrustDomain, defaultMTLS v1alpha1.MTLSMode, log *slog.Logger) (*enforcement, error) {
	if pf.EventsRate <= 0 {
		return nil, fmt.Errorf("security events rate %v: want a positive number", pf.EventsRate)
	}
	out, err := openOutput(pf.SecurityEvents, pf.Stderr, 0o600)
	if err != nil {
		return nil, fmt.Errorf("security events: %w", err)
	}
	mode := defaultMTLS
	if mode == v1alpha1.MTLSUnset {
		mode = v1alpha1.MTLSPermissive
	}
	en := &enforcement{log: log, evOut: out}
	en.eng = policy.NewEngine(policy.Options{RootNamespace: pf.RootNamespace, TrustDomain: td, DefaultDeny: pf.DefaultDeny,
		DefaultMTLS: mode, Logger: log})
	en.ev = events.NewWriter(out, events.WriterOptions{Name: "security_events", Node: node, Rate: pf.EventsRate, Logger: log})
	en.az = enforce.New(en.eng, enforce.Options{TrustDomain: td, Events: en.ev, Logger: log, NoPreCheck: pf.NoPreCheck})
	return en, nil
}

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
func (en *enforcement) ztunnelHooks(cfg *ztunnel.Config) {
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
		f := events.Flow{Time: r.Time, Kind: events.KindSecurityEvent, Event: events.Deny, Stage: events.StageProtocol,
			Direction: string(ztunnel.Inbound), Path: "hbone", MTLS: true, Src: events.Endpoint{Addr: r.Src}, Dst: events.Endpoint{Addr: r.Dst},
			ResponseFlag: r.Flag.String(), Verdict: events.Denied, Reason: reason, Rule: -1}
		if !r.SrcID.IsZero() {
			f.Src.Identity = r.SrcID.String()
		}
		if r.Err != nil {
			f.Error = r.Err.Error()
		}
		en.ev.Emit(&f)
	}
}

// close releases the event output.
func (en *enforcement) close() { en.evOut.Close() }
