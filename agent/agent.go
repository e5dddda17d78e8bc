// Package agent is mantlet's node agent: it makes the node's data path
// match the desired state of the cluster. For every enrolled pod of its
// node it finds the pod's veth (by the route to the pod's IP), enrolls it
// in the eBPF data path and asks for its identity's SVID ahead of time; it
// un-enrolls pods that left or opted out, retries what failed with
// backoff, and answers the readiness probe. Package node gives it each
// desired state a source emits (see package source).
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// Datapath is the node's eBPF data path as the agent drives it; *bpf.Datapath
// implements it.
type Datapath interface {
	// EnrollPod attaches the pod programs to the pod's veth and records the
	// pod's addresses (for anti-spoofing and for the uplink program);
	// enrolling an enrolled veth again updates it.
	EnrollPod(p bpf.Pod) error
	// UnenrollPod detaches the programs from the veth and forgets the pod.
	UnenrollPod(ifindex int) error
	// SetLocalPod tells the uplink program whether ip belongs to a local
	// enrolled pod, so that HBONE to it is captured.
	SetLocalPod(ip netip.Addr, on bool) error
	// Status reports what is attached, including what a previous agent
	// left pinned, and checks the kernel state.
	Status() bpf.Status
	// EnrolledPods returns the ifindexes of the enrolled veths (Status's
	// Pods) without checking anything.
	EnrolledPods() []int
}

// LinkFinder finds the host side of a local pod's veth.
type LinkFinder interface {
	// PodLink returns the ifindex, in the node's namespace, of the veth
	// that leads to the pod with address ip.
	PodLink(ip netip.Addr) (int, error)
}

// LinkChanges is implemented by a LinkFinder that can tell when its
// answers may have changed; *RouteLinks implements it. A resync then looks
// up the pods' veths again only when they may have.
type LinkChanges interface {
	// LinksVersion returns a number that changes whenever an answer of
	// PodLink may change (on Linux: a link or route of the node changed),
	// and ok false when it cannot tell.
	LinksVersion() (version uint64, ok bool)
}

// Identities keeps the SVIDs of the node's identities; *identity.Manager
// implements it.
type Identities interface {
	// Prefetch starts fetching the SVID of id if it is not held yet.
	Prefetch(id spiffeid.ID)
	// Forget drops the SVID of an identity no local pod has any more.
	Forget(id spiffeid.ID)
}

// State is what the agent is asked to make true.
type State struct {
	// Snapshot is the cluster: every workload (local ones get enrolled,
	// the others are known to the ztunnel for routing), service and node.
	Snapshot *workload.Snapshot
	// MTLS holds the mode of namespaces that chose one; the others get
	// Config.DefaultMTLS.
	MTLS map[string]v1alpha1.MTLSMode
}

// Defaults of Config.
const (
	DefaultRetryMin = 200 * time.Millisecond
	DefaultRetryMax = 5 * time.Second
	DefaultResync   = 10 * time.Second
)

// Config configures an Agent. Node, Datapath and Links are required.
type Config struct {
	// Node is the name of this node, as pods' spec.nodeName say.
	Node string
	// TrustDomain names the pods' identities (identity.DefaultTrustDomain
	// when zero).
	TrustDomain spiffeid.TrustDomain
	// DefaultMTLS applies to namespaces without a mode of their own
	// (default PERMISSIVE).
	DefaultMTLS v1alpha1.MTLSMode
	// MTLSMode, if set, gives each local pod's mode (the policy engine,
	// which folds in policies, namespace annotations and the default);
	// MTLSUnset falls back to the namespace's mode in State, then
	// DefaultMTLS. A pod whose mode changes is enrolled again.
	MTLSMode func(w *workload.Workload) v1alpha1.MTLSMode
	// Datapath is the eBPF data path.
	Datapath Datapath
	// Links finds pods' veths.
	Links LinkFinder
	// Identities, if set, is told which identities the node's pods have.
	Identities Identities
	// Plaintext, if set, ends the plaintext connections that bypassed the
	// ztunnel of each pod that turns STRICT (see PlaintextCloser); nil
	// leaves them open.
	Plaintext PlaintextCloser
	// Store, if set, receives every snapshot as the agent takes it up (for
	// a ztunnel that reads it). A node that publishes snapshots to its
	// ztunnel itself, together with the policy engine, leaves it nil.
	Store *workload.Store
	// Logger receives enrollments (Info) and failures (Warn); nil discards.
	Logger *slog.Logger
	// RetryMin and RetryMax bound the backoff between attempts to enroll
	// or un-enroll a pod that failed (defaults 200ms and 5s).
	RetryMin, RetryMax time.Duration
	// Ready, if set, is asked too by the readiness probe: false with a
	// reason makes the node not ready (the node uses it for a source that
	// cannot be read for too long).
	Ready func() (bool, string)
	// Resync is how often the agent re-checks every pod even when nothing
	// changed, to repair drift such as a recreated veth (default 10s).
	// With Links that tell when their answers may change (LinkChanges,
	// such as RouteLinks), a resync looks up the pods' veths again only
	// after a change.
	Resync time.Duration
}

// Agent reconciles the node's data path with the desired State.
type Agent struct {
	cfg  Config
	log  *slog.Logger
	wake chan struct{}

	inMu    sync.Mutex // guards desired, pending and recheck
	desired *State
	pending bool // desired changed since the last reconcile
	recheck bool // Recheck was called since the last reconcile

	// Published for readers (probe, metrics) at the end of each pass, so
	// they never wait for a long reconcile.
	applied  atomic.Bool // a state has been reconciled once
	draining atomic.Bool
	status   atomic.Pointer[[]PodStatus]
	changed  chan struct{} // a value when Pods reports something new (coalesced)
	// plainClosed counts connections ended by Config.Plaintext.
	plainClosed atomic.Uint64
	// refusedBridged counts the pods refused because the node's CNI is a
	// bridged one (each pod once while the agent tracks it: a held pod
	// whose sandbox the runtime makes again counts again).
	refusedBridged atomic.Uint64

	mu       sync.Mutex           // serialises reconcile passes
	scratch  []PodStatus          // publish's, reused: a pass that changes nothing allocates no new status
	pods     map[string]*podState // by workload UID: pods enrolled or to enroll
	removing map[int]*podState    // by ifindex: veths to un-enroll that failed to
	ids      map[spiffeid.ID]bool // identities announced to Identities
	// lastFull is when a pass last checked every pod: a pass for a new
	// state checks only the pods whose desired state changed, and one
	// every Config.Resync (at the latest) checks them all.
	lastFull time.Time
	// linksSeen is the LinkChanges version of Config.Links when a pass
	// last looked up every pod's veth (linksKnown: if it could tell). A
	// resync looks them up again only if the version changed since, as
	// the answers would otherwise be the same; Recheck always does.
	linksSeen  uint64
	linksKnown bool
}

// podState is what the agent knows of one local enrolled pod.
type podState struct {
	uid, name string
	id        spiffeid.ID
	ips       []netip.Addr
	strict    bool
	ifindex   int          // the veth enrolled, 0 when not (yet)
	local     []netip.Addr // addresses marked as local pods for the uplink
	cut       plainCut     // plaintext connections to end once STRICT

	failures int
	retryAt  time.Time
	lastErr  string
	reason   string     // ReasonBridgedCNI when refused, "" otherwise
	wantIP   netip.Addr // the pod's first address in the desired state
}

// New checks cfg and returns an Agent; call Run, then Apply.
func New(cfg Config) (*Agent, error) {
	switch {
	case cfg.Node == "":
		return nil, errors.New("agent: config: Node is required")
	case cfg.Datapath == nil:
		return nil, errors.New("agent: config: Datapath is required")
	case cfg.Links == nil:
		return nil, errors.New("agent: config: Links is required")
	}
	if cfg.TrustDomain.IsZero() {
		cfg.TrustDomain = identity.DefaultTrustDomain
	}
	if cfg.DefaultMTLS == v1alpha1.MTLSUnset {
		cfg.DefaultMTLS = v1alpha1.MTLSPermissive
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(DefaultRetryMax, cfg.RetryMin)
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Agent{
		cfg:      cfg,
		log:      log,
		wake:     make(chan struct{}, 1),
		changed:  make(chan struct{}, 1),
		pods:     map[string]*podState{},
		removing: map[int]*podState{},
		ids:      map[spiffeid.ID]bool{},
	}, nil
}

// Apply makes s the desired state. It does not block: Run reconciles.
func (a *Agent) Apply(s State) {
	if s.Snapshot == nil {
		s.Snapshot = workload.Empty()
	}
	a.inMu.Lock()
	a.desired = &s
	a.pending = true
	a.inMu.Unlock()
	a.kick()
}

func (a *Agent) kick() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// Run reconciles until ctx is done: at once when a new state is applied,
// when a failed pod's retry is due, and every Config.Resync. It returns nil
// when ctx is done. Enrolled pods stay enrolled (their programs and maps
// are pinned), so traffic keeps its protection while the agent is away.
func (a *Agent) Run(ctx context.Context) error {
	timer := time.NewTimer(a.cfg.Resync)
	defer timer.Stop()
	for {
		next := a.reconcile(ctx, time.Now())
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			a.draining.Store(true)
			return nil
		case <-a.wake:
		case <-timer.C:
		}
	}
}

// desiredPod is a local pod that should be enrolled.
type desiredPod struct {
	w      *workload.Workload
	id     spiffeid.ID
	ips    []netip.Addr
	strict bool
}

// reconcile does one pass and returns when the next is due.
func (a *Agent) reconcile(ctx context.Context, now time.Time) (next time.Time) {
	a.inMu.Lock()
	desired, pending, recheck := a.desired, a.pending, a.recheck
	a.pending, a.recheck = false, false
	a.inMu.Unlock()
	if desired == nil {
		return now.Add(a.cfg.Resync)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	defer a.publish()
	defer func() {
		// A bug in a collaborator must not stop the node's agent: log it
		// and try again later.
		if r := recover(); r != nil {
			a.log.Error("agent: reconcile panicked; retrying", "panic", r, "stack", string(debug.Stack()))
			next = now.Add(a.cfg.RetryMax)
		}
	}()
	if pending && a.cfg.Store != nil {
		a.cfg.Store.Replace(desired.Snapshot)
	}
	want := a.wanted(desired, pending)
	// A pass for a new state re-checks only the pods the state changed
	// (a route lookup each costs the same for an unchanged pod as for a
	// new one); a resync, a Recheck, or any pass once Resync has passed
	// since the last full one, re-checks every pod, so that drift (a
	// recreated veth) is repaired even while states keep coming.
	full := !pending || recheck || now.Sub(a.lastFull) >= a.cfg.Resync
	if full {
		a.lastFull = now
	}
	// A full pass looks up every pod's veth again only if one may have
	// changed since the last full pass: Links cannot tell (see
	// LinkChanges), a link or route of the node changed, or Recheck
	// asked. Otherwise it checks every pod against the data path's state
	// (a detached veth, a failed pod), which needs no lookup: an idle
	// node's agent lists no routes. The version is read before the
	// lookups, so a change during them makes the next resync look again,
	// and kept once every pod was dealt with (not if the pass panicked).
	lookup := full
	var ver uint64
	var known bool
	if lc, ok := a.cfg.Links.(LinkChanges); ok && full {
		ver, known = lc.LinksVersion()
		if known && a.linksKnown && ver == a.linksSeen && !recheck {
			lookup = false
		}
	}
	p := &pass{now: now, next: a.lastFull.Add(a.cfg.Resync), full: lookup, enrolled: map[int]bool{}, owned: map[int]bool{}}
	for _, ifindex := range a.cfg.Datapath.EnrolledPods() {
		p.enrolled[ifindex] = true
	}
	a.unenrollDeparted(p, want)
	for _, uid := range sortedKeys(want) {
		a.enrollWanted(p, uid, want[uid])
	}
	if full {
		a.linksSeen, a.linksKnown = ver, known
	}
	// Only when every wanted pod was resolved, so that a transient lookup
	// failure never un-enrolls (and so un-protects) a live pod.
	if p.unresolved == 0 {
		a.unenrollStale(p)
	}
	if t := a.closePlaintext(ctx, now); !t.IsZero() {
		p.due(t)
	}
	a.syncIdentities(want)
	a.applied.Store(true)
	return p.next
}

// pass is the bookkeeping of one reconcile pass.
type pass struct {
	now, next  time.Time
	full       bool         // look up every pod's veth, not only unsettled pods'
	enrolled   map[int]bool // veths the data path has enrolled
	owned      map[int]bool // veths of the pods that should be enrolled
	unresolved int          // wanted pods not (yet) in their desired state
}

// due makes the next pass come no later than t.
func (p *pass) due(t time.Time) {
	if t.Before(p.next) {
		p.next = t
	}
}

// attempt runs step for st when st's next attempt is due, and reports
// whether it ran and succeeded. A failure is recorded in st with backoff
// (see fail), a success clears st's failures. A pass never comes later
// than the retry of a pod that is waiting for one.
func (a *Agent) attempt(p *pass, st *podState, step func() error) bool {
	if st.retryAt.After(p.now) {
		p.due(st.retryAt)
		return false
	}
	if err := step(); err != nil {
		a.fail(st, p.now, err)
		p.due(st.retryAt)
		return false
	}
	st.failures, st.retryAt, st.lastErr, st.reason = 0, time.Time{}, "", ""
	return true
}

// unenrollDeparted un-enrolls the veths of pods that left, opted out or
// moved away.
func (a *Agent) unenrollDeparted(p *pass, want map[string]desiredPod) {
	for uid, st := range a.pods {
		if _, ok := want[uid]; ok {
			continue
		}
		delete(a.pods, uid)
		if st.ifindex != 0 {
			st.failures, st.retryAt = 0, time.Time{}
			a.removing[st.ifindex] = st
		}
	}
	for ifindex, st := range a.removing {
		gone := !p.enrolled[ifindex] // the veth was deleted
		if !a.attempt(p, st, func() error { return a.unenroll(p, st, ifindex) }) {
			continue
		}
		delete(a.removing, ifindex)
		if gone {
			a.log.Info("pod un-enrolled", "pod", st.name, "ifindex", ifindex, "reason", "veth gone")
		} else {
			a.log.Info("pod un-enrolled", "pod", st.name, "ifindex", ifindex)
		}
	}
}

// unenroll unmarks a departed pod's addresses, then detaches its veth if
// the veth is still there.
func (a *Agent) unenroll(p *pass, st *podState, ifindex int) error {
	if err := a.markLocal(st, nil); err != nil {
		return err
	}
	if !p.enrolled[ifindex] {
		return nil
	}
	if err := a.cfg.Datapath.UnenrollPod(ifindex); err != nil {
		return fmt.Errorf("un-enroll veth %d: %w", ifindex, err)
	}
	delete(p.enrolled, ifindex)
	return nil
}

// enrollWanted brings the pod uid, which should be enrolled as d says, to
// that state: enrolled on its veth, with its addresses and mode.
func (a *Agent) enrollWanted(p *pass, uid string, d desiredPod) {
	st := a.pods[uid]
	if st == nil {
		st = &podState{uid: uid, name: d.w.String()}
		a.pods[uid] = st
	}
	st.wantIP = d.ips[0]
	if st.ifindex != 0 {
		p.owned[st.ifindex] = true
	}
	if !p.full && st.settled(p, d) && a.removing[st.ifindex] == nil {
		st.id = d.id
		return
	}
	if !a.attempt(p, st, func() error { return a.enroll(p, st, d) }) {
		p.unresolved++
	}
}

// enroll finds the pod's veth and enrolls it, unless it is enrolled as d
// says already; then it marks the pod's addresses local.
func (a *Agent) enroll(p *pass, st *podState, d desiredPod) error {
	ifindex, err := a.cfg.Links.PodLink(d.ips[0])
	if err != nil {
		return fmt.Errorf("find veth: %w", err)
	}
	p.owned[ifindex] = true
	if rm := a.removing[ifindex]; rm != nil {
		// The veth was to be un-enrolled for a pod that left, and now
		// belongs to this one: keep it, drop only the leaver's marks.
		delete(a.removing, ifindex)
		for _, ip := range rm.local {
			if !slices.Contains(d.ips, ip) {
				if err := a.cfg.Datapath.SetLocalPod(ip, false); err != nil {
					a.log.Warn("agent: unmark a departed pod's address failed", "pod", rm.name, "ip", ip, "error", err)
				}
			}
		}
	}
	if st.ifindex == ifindex && p.enrolled[ifindex] && st.strict == d.strict && slices.Equal(st.ips, d.ips) {
		st.id = d.id
		return a.markLocal(st, d.ips)
	}
	if err := a.cfg.Datapath.EnrollPod(bpf.Pod{HostIfindex: ifindex, IPs: d.ips, Strict: d.strict}); err != nil {
		return fmt.Errorf("enroll veth %d: %w", ifindex, err)
	}
	adopted := st.ifindex == 0 && p.enrolled[ifindex]
	if old := st.ifindex; old != 0 && old != ifindex {
		// The pod's sandbox was recreated: its old veth is stale.
		delete(p.owned, old)
		if p.enrolled[old] {
			rm := &podState{name: st.name, ifindex: old}
			if a.attempt(p, rm, func() error { return a.unenroll(p, rm, old) }) {
				a.log.Info("old veth un-enrolled", "pod", st.name, "ifindex", old, "reason", "the pod has a new veth")
			} else {
				a.removing[old] = rm // retried with the veths of departed pods
			}
		}
	}
	// Turned STRICT, or enrolled STRICT by this agent: end the plaintext
	// connections the kernel would now refuse to open.
	st.cut.due = d.strict && (st.cut.due || !st.strict || st.ifindex != ifindex)
	st.ifindex, st.ips, st.strict, st.id = ifindex, d.ips, d.strict, d.id
	p.enrolled[ifindex] = true
	if err := a.markLocal(st, d.ips); err != nil {
		return err
	}
	a.log.Info("pod enrolled", "pod", st.name, "ip", d.ips[0], "ifindex", ifindex, "strict", d.strict, "spiffe_id", d.id.String(), "adopted", adopted)
	return nil
}

// settled reports whether st is enrolled as d asks, on a veth the data
// path has, with nothing failed or pending: a pass for a new state leaves
// such a pod alone.
func (st *podState) settled(p *pass, d desiredPod) bool {
	return st.ifindex != 0 && p.enrolled[st.ifindex] && st.failures == 0 && st.strict == d.strict &&
		slices.Equal(st.ips, d.ips) && slices.Equal(st.local, d.ips)
}

// unenrollStale un-enrolls veths that no pod we know owns: pods removed
// while no agent ran.
func (a *Agent) unenrollStale(p *pass) {
	for ifindex := range p.enrolled {
		if p.owned[ifindex] || a.removing[ifindex] != nil {
			continue
		}
		if err := a.cfg.Datapath.UnenrollPod(ifindex); err != nil {
			a.log.Warn("agent: un-enroll stale veth failed; will retry", "ifindex", ifindex, "error", err)
			p.due(p.now.Add(a.cfg.RetryMin))
			continue
		}
		a.log.Info("stale veth un-enrolled", "ifindex", ifindex, "reason", "no pod of the desired state uses it")
	}
}

// wanted lists the local pods of desired that should be enrolled, by UID.
// With logSkips it logs the pods it cannot enroll.
func (a *Agent) wanted(desired *State, logSkips bool) map[string]desiredPod {
	want := map[string]desiredPod{}
	for _, w := range desired.Snapshot.LocalWorkloads(a.cfg.Node) {
		if !w.Enrolled {
			continue
		}
		var ips []netip.Addr
		for _, ip := range w.IPs {
			if ip.Unmap().Is4() {
				ips = append(ips, ip.Unmap())
			}
		}
		if len(ips) == 0 {
			if logSkips {
				a.log.Warn("agent: pod not enrolled: it has no IPv4 address, and IPv6 capture is not supported yet", "pod", w.String())
			}
			continue
		}
		id, err := w.ID(a.cfg.TrustDomain)
		if err != nil {
			if logSkips {
				a.log.Warn("agent: pod not enrolled: no valid identity", "pod", w.String(), "error", err)
			}
			continue
		}
		mode := v1alpha1.MTLSUnset
		if a.cfg.MTLSMode != nil {
			mode = a.cfg.MTLSMode(w)
		}
		if mode == v1alpha1.MTLSUnset {
			mode = desired.MTLS[w.Namespace]
		}
		if mode == v1alpha1.MTLSUnset {
			mode = a.cfg.DefaultMTLS
		}
		want[w.UID] = desiredPod{w: w, id: id, ips: ips, strict: mode == v1alpha1.MTLSStrict}
	}
	return want
}

// markLocal makes the pod's addresses marked for the uplink program equal
// to want (nil: none), recording progress in st.local.
func (a *Agent) markLocal(st *podState, want []netip.Addr) error {
	for _, ip := range want {
		if slices.Contains(st.local, ip) {
			continue
		}
		if err := a.cfg.Datapath.SetLocalPod(ip, true); err != nil {
			return fmt.Errorf("mark %s local for HBONE capture: %w", ip, err)
		}
		st.local = append(st.local, ip)
	}
	for i := 0; i < len(st.local); {
		ip := st.local[i]
		if slices.Contains(want, ip) {
			i++
			continue
		}
		if err := a.cfg.Datapath.SetLocalPod(ip, false); err != nil {
			return fmt.Errorf("unmark %s as local: %w", ip, err)
		}
		st.local = slices.Delete(st.local, i, i+1)
	}
	if slices.Equal(st.local, want) {
		return nil
	}
	st.local = slices.Clone(want) // same set, canonical order
	return nil
}

// fail records a failed attempt and schedules the next one.
func (a *Agent) fail(st *podState, now time.Time, err error) {
	st.failures++
	wait := a.backoff(st.failures)
	st.retryAt = now.Add(wait)
	msg := err.Error()
	// The first failure, and any new kind of failure, at Warn; repeats at
	// Debug, so a pod whose veth is not there yet does not flood the log.
	level := slog.LevelDebug
	if msg != st.lastErr {
		level = slog.LevelWarn
	}
	st.lastErr = msg
	if errors.Is(err, ErrBridgedCNI) {
		// Not a wait for the CNI: a node mantlet cannot capture on. Say so
		// loudly, never enroll the pod, and keep checking in case the
		// pod's wiring changes.
		if st.reason != ReasonBridgedCNI {
			st.reason = ReasonBridgedCNI
			a.refusedBridged.Add(1)
		}
		if level == slog.LevelWarn {
			level = slog.LevelError
		}
		a.log.Log(context.Background(), level, "agent: pod refused: bridged CNI is not supported; its traffic is not captured, and new sandboxes of meshed pods are held by the CNI plugin",
			"pod", st.name, "error", msg, "attempts", st.failures, "retry_in", wait)
		return
	}
	st.reason = ""
	a.log.Log(context.Background(), level, "agent: pod not enrolled; will retry", "pod", st.name, "error", msg, "attempts", st.failures, "retry_in", wait)
}

// RefusedBridged returns how many times the agent refused a pod because
// its address leads to a bridge (ErrBridgedCNI): once per pod, and again
// when a held pod comes back with a new sandbox.
func (a *Agent) RefusedBridged() uint64 { return a.refusedBridged.Load() }

// backoff is the wait before the next attempt after failures failed ones.
func (a *Agent) backoff(failures int) time.Duration {
	wait := a.cfg.RetryMin << min(failures-1, 16)
	if wait > a.cfg.RetryMax || wait <= 0 {
		wait = a.cfg.RetryMax
	}
	return wait
}

// syncIdentities prefetches the SVIDs of local identities and forgets the
// ones no local pod has any more.
func (a *Agent) syncIdentities(want map[string]desiredPod) {
	if a.cfg.Identities == nil {
		return
	}
	now := map[spiffeid.ID]bool{}
	for _, d := range want {
		now[d.id] = true
		if !a.ids[d.id] {
			a.cfg.Identities.Prefetch(d.id)
		}
	}
	for id := range a.ids {
		if !now[id] {
			a.cfg.Identities.Forget(id)
		}
	}
	a.ids = now
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// PodStatus is the agent's view of one local enrolled pod.
type PodStatus struct {
	// Pod is namespace/name.
	Pod string
	// UID is the workload's UID (a pod's Kubernetes UID): a pod deleted
	// and created again under its name is another pod.
	UID string
	// IP is the pod's first IPv4 address.
	IP netip.Addr
	// Ifindex is the enrolled veth, 0 when not enrolled (yet).
	Ifindex int
	// Strict is true when the pod is in STRICT mTLS mode.
	Strict bool
	// Err is the last failure, "" when enrolled.
	Err string
	// Reason is ReasonBridgedCNI when the agent refuses the pod because
	// mantlet cannot capture it on this node (Err says more), "" when
	// the pod is enrolled or waits to be.
	Reason string
}

// Pods reports every local pod the agent wants enrolled, sorted by name,
// as of the end of the last reconcile pass.
func (a *Agent) Pods() []PodStatus {
	if p := a.status.Load(); p != nil {
		return *p
	}
	return nil
}

// publish makes the pods' state visible to Pods and Ready. Called with
// a.mu held.
func (a *Agent) publish() {
	out := a.scratch[:0]
	for _, st := range a.pods {
		ps := PodStatus{Pod: st.name, UID: st.uid, Ifindex: st.ifindex, Strict: st.strict, Err: st.lastErr, Reason: st.reason}
		if len(st.ips) > 0 {
			ps.IP = st.ips[0]
		}
		if st.ifindex == 0 || st.lastErr != "" {
			// Not (yet) enrolled at its current address: report that one,
			// so that whoever waits for the pod (the CNI plugin) sees why.
			ps.IP = st.wantIP
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(x, y PodStatus) int { return strings.Compare(x.Pod, y.Pod) })
	a.scratch = out
	if prev := a.status.Load(); prev != nil && slices.Equal(*prev, out) {
		return // readers keep the one they have
	}
	pub := slices.Clone(out)
	if pub == nil {
		pub = []PodStatus{}
	}
	a.status.Store(&pub)
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// Changed receives a value after a reconcile pass that changed what Pods
// reports (values are coalesced: one waits for any number of changes), so
// that the pods' state can be told to the cluster without polling.
func (a *Agent) Changed() <-chan struct{} { return a.changed }

// Ready reports whether the node can carry captured traffic: a state has
// been applied, the data path's programs are attached and the ztunnel's
// listeners are in the SOCKMAP. The reason says what is missing, or sums
// up the node when ready.
func (a *Agent) Ready() (bool, string) { return a.readyWith(a.Pods()) }

// readyWith is Ready, given the pods' state.
func (a *Agent) readyWith(pods []PodStatus) (bool, string) {
	failing := pending(pods)
	switch {
	case a.draining.Load():
		return false, "shutting down"
	case !a.applied.Load():
		return false, "waiting for the first workload snapshot"
	}
	st := a.cfg.Datapath.Status()
	if !st.Ready() {
		return false, st.String()
	}
	if a.cfg.Ready != nil {
		if ok, why := a.cfg.Ready(); !ok {
			return false, why
		}
	}
	return true, fmt.Sprintf("ready: %d local pods enrolled, %d pending, %d veths attached", len(pods)-failing, failing, len(st.Pods))
}

// Settled reports whether the agent is ready and every local pod is
// enrolled: the work of its start, or of a change, is done.
func (a *Agent) Settled() bool {
	pods := a.Pods()
	ok, _ := a.readyWith(pods)
	return ok && pending(pods) == 0
}

// pending counts the pods not enrolled: no veth found yet, or an error.
func pending(pods []PodStatus) int {
	n := 0
	for _, p := range pods {
		if p.Ifindex == 0 || p.Err != "" {
			n++
		}
	}
	return n
}

// Drain marks the agent as shutting down, so the readiness probe fails
// while the ztunnel finishes its connections.
func (a *Agent) Drain() { a.draining.Store(true) }

// The data path of package bpf is the one the agent drives.
var _ Datapath = (*bpf.Datapath)(nil)

// Recheck asks for a reconcile pass now, as if the state had changed:
// every local pod's veth is looked up again (a sandbox made again with
// the same address has a new one), even if Config.Links saw no change
// yet (see LinkChanges).
func (a *Agent) Recheck() {
	a.inMu.Lock()
	a.recheck = true
	a.inMu.Unlock()
	a.kick()
}
