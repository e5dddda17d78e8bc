// Package source defines where a node learns the cluster's desired state
// from: a Source (a local file in standalone mode, the Kubernetes API in a
// cluster) emits the whole state as one immutable State with a
// generation, and the node puts it in force at once (the ztunnel's
// workloads, the policy engine and the agent's enrolments switch
// together). Nothing below the node knows which source a state came from.
package source

import (
	"context"
	"time"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// State is the desired state of the cluster at one generation. A State is
// never changed once emitted.
type State struct {
	// Generation grows with every state a source emits.
	Generation uint64
	// Snapshot holds the nodes, every pod with an address (meshed or not:
	// the ztunnel routes to both) and the services.
	Snapshot *workload.Snapshot
	// Policies are the MeshPolicies in force, each already validated, and
	// those a source derives from other settings (a namespace's
	// mantlet.io/mtls annotation becomes a namespace-wide policy that sets
	// its mode). The policy engine gives each pod its mTLS mode from them.
	Policies []*v1alpha1.MeshPolicy
}

// Status says how a source fares, for 'mantlet status' and the metrics.
type Status struct {
	// Kind is "file" or "kubernetes"; Where names the file or the API
	// server.
	Kind, Where string
	// Applied and Rejected count the versions emitted and refused.
	Applied, Rejected uint64
	// AppliedAt is when the state in force was read; RejectedAt when a
	// version was last refused (zero if none was).
	AppliedAt, RejectedAt time.Time
	// LastEditRejected is true while the newest version is refused, so an
	// older one stays in force; Problems then say why.
	LastEditRejected bool
	Problems         []string
	// Unreachable is true while the source cannot be read (the API server
	// does not answer) since UnreachableSince; the last state stays in
	// force meanwhile.
	Unreachable      bool
	UnreachableSince time.Time
}

// PodReport is what a node made of one of its pods, for a source that
// tells the cluster (Reporter).
type PodReport struct {
	Namespace, Name string
	// UID is the pod's UID: the report is about that pod only, not
	// another one created under the same name meanwhile.
	UID string
	// Enrolled: the pod's traffic is captured; Strict: in STRICT mode.
	Enrolled, Strict bool
	// Err says why a pod that should be enrolled is not (yet).
	Err string
	// Reason, when set, says the node refuses the pod rather than waits
	// for it (agent.ReasonBridgedCNI); it is the reason of the pod's
	// Meshed condition.
	Reason string
}

// Reporter is a source that writes back to the cluster what the mesh made
// of it: whether each policy is in force, whether each pod is meshed.
type Reporter interface {
	// Report writes back until ctx ends; pods lists the node's own pods.
	// A value on changed (nil: never) says that what pods returns has
	// changed: the pods are written back then, not only periodically.
	Report(ctx context.Context, node string, pods func() []PodReport, changed <-chan struct{}) error
}

// Source is where the desired state comes from.
type Source interface {
	// Initial returns the first complete state. Its error stops the node
	// before anything is loaded (a bad file at start-up, an API server
	// that never answered).
	Initial(ctx context.Context) (*State, error)
	// Run emits every later state until ctx ends; it returns nil then. A
	// version the source refuses is never emitted: the last good state
	// stays in force.
	Run(ctx context.Context, publish func(*State)) error
	// Status reports how the source fares.
	Status() Status
}
