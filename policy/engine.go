package policy

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// DefaultRootNamespace is the mesh root namespace unless configured
// otherwise: its policies apply to workloads of every namespace.
const DefaultRootNamespace = "mantlet-system"

// Options configure an Engine. The zero value is usable.
type Options struct {
	// RootNamespace is the mesh root namespace; DefaultRootNamespace when
	// empty.
	RootNamespace string
	// TrustDomain is the mesh's trust domain: source namespace and service
	// account are read from source SPIFFE IDs of this trust domain only.
	// identity.DefaultTrustDomain when zero.
	TrustDomain spiffeid.TrustDomain
	// DefaultDeny turns on default-deny for every workload, as a
	// spec.defaultDeny root-namespace policy without selector does.
	DefaultDeny bool
	// DefaultMTLS is the mode of workloads no policy sets one for;
	// PERMISSIVE when empty.
	DefaultMTLS v1alpha1.MTLSMode
	// Logger receives one line per accepted or rejected policy set;
	// nothing is logged when nil.
	Logger *slog.Logger
}

// Engine holds the compiled policy set in force and answers decisions.
// Decide, MTLSMode and RateLimit are safe for concurrent use, lock-free and
// do not allocate; Update and SetWorkloads replace the compiled state whole.
type Engine struct {
	opts Options

	mu   sync.Mutex // serialises writers
	set  *policySet
	snap *workload.Snapshot
	// compiled holds the set in force by the policy each was compiled
	// from: a policy given again (the same object: sources keep those that
	// did not change) is not compiled again.
	compiled map[*v1alpha1.MeshPolicy]*cpolicy

	cur atomic.Pointer[view]
}

// NewEngine returns an engine with no policies and no workloads: every
// connection is allowed (unless opts.DefaultDeny).
func NewEngine(opts Options) *Engine {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = identity.DefaultTrustDomain
	}
	if opts.DefaultMTLS == "" {
		opts.DefaultMTLS = v1alpha1.MTLSPermissive
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	e := &Engine{opts: opts, snap: workload.Empty()}
	e.set, e.compiled, _ = compileSet(nil, opts.RootNamespace, 0, nil)
	e.cur.Store(buildView(e.set, e.snap, &e.opts, nil, nil))
	return e
}

// Update compiles policies as one set and puts it in force. The set is
// all-or-nothing: when any policy is invalid, or two share a
// namespace/name, Update returns an error listing every problem of every
// invalid policy (it wraps ErrInvalid and one *ValidationError per
// policy), and the previous set stays in force.
func (e *Engine) Update(policies []*v1alpha1.MeshPolicy) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.applyLocked(e.snap, policies)
}

// Apply puts a new state in force in one step: the workloads and the
// policy set together, so that no decision sees one without the other. On
// error (a set that does not compile) nothing changes.
func (e *Engine) Apply(s *workload.Snapshot, policies []*v1alpha1.MeshPolicy) error {
	if s == nil {
		s = workload.Empty()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.applyLocked(s, policies)
}

func (e *Engine) applyLocked(s *workload.Snapshot, policies []*v1alpha1.MeshPolicy) error {
	set, compiled, err := compileSet(policies, e.opts.RootNamespace, e.set.gen+1, e.compiled)
	if err != nil {
		e.opts.Logger.Warn("policy set rejected; previous set stays in force",
			"policies", len(policies), "generation", e.set.gen, "error", err)
		return fmt.Errorf("policy: set of %d rejected, generation %d stays in force: %w", len(policies), e.set.gen, err)
	}
	changed := changedNamespaces(e.compiled, compiled, e.opts.RootNamespace)
	e.set, e.snap, e.compiled = set, s, compiled
	e.cur.Store(buildView(e.set, e.snap, &e.opts, e.cur.Load(), changed))
	e.opts.Logger.Info("policy set in force", "policies", len(set.policies), "generation", set.gen)
	return nil
}

// SetWorkloads gives the engine the current workloads, so that decisions
// about them use a precomputed index. Decisions about a workload the
// engine has not seen (or whose labels changed) are still correct, only
// slower and allocating. A nil snapshot is an empty one.
func (e *Engine) SetWorkloads(s *workload.Snapshot) {
	if s == nil {
		s = workload.Empty()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.snap = s
	e.cur.Store(buildView(e.set, e.snap, &e.opts, e.cur.Load(), map[string]bool{}))
}

// Generation counts the policy sets put in force; it changes exactly when
// Update succeeds, so callers know when to re-evaluate open connections.
func (e *Engine) Generation() uint64 { return e.cur.Load().set.gen }

// Decide returns the verdict on one connection.
func (e *Engine) Decide(in Input) Decision {
	v := e.cur.Load()
	d := Decision{Rule: -1}
	if in.Dst == nil {
		d.Allowed, d.Reason = true, ReasonNotMeshed
		return d
	}
	ent := v.lookup(in.Dst)
	var s source
	if in.MTLS {
		s.id, s.ns, s.sa = in.SrcID.String(), in.SrcNamespace, in.SrcServiceAccount
		if s.ns == "" && s.sa == "" {
			s.ns, s.sa = workloadParts(in.SrcID, v.td)
		}
	}
	s.ip = in.SrcIP.Unmap()
	port := in.DstPort

	ent.audit.audit(&s, port, &d)
	if !in.MTLS && ent.mtls == v1alpha1.MTLSStrict {
		d.Reason, d.Policy = ReasonPlaintextStrict, ent.mtlsPolicy
		return d
	}
	if r, ok := ent.deny.first(&s, port); ok {
		d.Reason, d.Action, d.Policy, d.Rule = ReasonDeniedByPolicy, v1alpha1.ActionDeny, r.p.key, int(r.rule)
		return d
	}
	if !ent.hasAllow {
		if ent.defaultDeny {
			d.Reason = ReasonDeniedByDefaultDeny
		} else {
			d.Allowed, d.Reason = true, ReasonAllowedByDefault
		}
		return d
	}
	if r, ok := ent.allow.first(&s, port); ok {
		d.Allowed, d.Reason, d.Action, d.Policy, d.Rule = true, ReasonAllowedByPolicy, v1alpha1.ActionAllow, r.p.key, int(r.rule)
		return d
	}
	d.Reason = ReasonNoAllowMatched
	return d
}

// MTLSMode returns the mTLS mode of dst: from the most specific policy
// that sets one (see v1alpha1.MeshPolicySpec.MTLS; STRICT wins a tie), else
// the engine's default. nil (not a mesh workload) gets the default.
func (e *Engine) MTLSMode(dst *workload.Workload) v1alpha1.MTLSMode {
	v := e.cur.Load()
	if dst == nil {
		return v.defaultMTLS
	}
	return v.lookup(dst).mtls
}

// RateLimit returns the rate limit in force for dst, and false when there
// is none. The most specific policy level that sets a rateLimit wins; at
// one level, each field takes the smallest value set.
func (e *Engine) RateLimit(dst *workload.Workload) (RateLimit, bool) {
	if dst == nil {
		return RateLimit{}, false
	}
	ent := e.cur.Load().lookup(dst)
	return ent.rate, ent.hasRate
}

// workloadParts returns the namespace and service account of a workload
// ID in trust domain td, without allocating; "", "" for any other ID.
func workloadParts(id spiffeid.ID, td spiffeid.TrustDomain) (ns, sa string) {
	if !id.MemberOf(td) {
		return "", ""
	}
	ns, sa, _ = identity.ParseWorkloadID(id)
	return ns, sa
}

// policySet is a compiled, validated set of policies.
type policySet struct {
	policies []*cpolicy // sorted by key; order is the index
	byNS     map[string][]*cpolicy
	root     []*cpolicy
	rootNS   string
	gen      uint64
}

// compileSet compiles in as one set. A policy of in found in cache (the
// last set's, by the policy compiled) is copied from there instead of
// compiled again. It returns the set and its policies by source.
func compileSet(in []*v1alpha1.MeshPolicy, rootNS string, gen uint64, cache map[*v1alpha1.MeshPolicy]*cpolicy) (*policySet, map[*v1alpha1.MeshPolicy]*cpolicy, error) {
	set := &policySet{byNS: map[string][]*cpolicy{}, rootNS: rootNS, gen: gen}
	var errs []error
	seen := make(map[string]bool, len(in))
	bySource := make(map[*v1alpha1.MeshPolicy]*cpolicy, len(in))
	for _, p := range in {
		var cp *cpolicy
		var err error
		if c, ok := cache[p]; ok {
			// Compiled policies are never changed but for their place in
			// a set (order, root), which a copy gets anew: the set in
			// force keeps its own.
			cc := *c
			cp = &cc
		} else {
			cp, err = compilePolicy(p)
		}
		key := p.Namespace + "/" + p.Name
		if seen[key] && p.Name != "" {
			dup := FieldError{Path: "metadata.name", Msg: "another MeshPolicy in the set has the same namespace and name; want unique names"}
			var ve *ValidationError
			if errors.As(err, &ve) {
				ve.Fields = append(ve.Fields, dup)
			} else {
				err = &ValidationError{Namespace: p.Namespace, Name: p.Name, Fields: []FieldError{dup}}
			}
		}
		seen[key] = true
		if err != nil {
			errs = append(errs, err)
			continue
		}
		set.policies = append(set.policies, cp)
		bySource[p] = cp
	}
	if len(errs) > 0 {
		return nil, nil, errors.Join(errs...)
	}
	slices.SortFunc(set.policies, func(a, b *cpolicy) int { return strings.Compare(a.key, b.key) })
	for i, p := range set.policies {
		p.order = int32(i)
		p.root = p.ns == rootNS
		if p.root {
			set.root = append(set.root, p)
		} else {
			set.byNS[p.ns] = append(set.byNS[p.ns], p)
		}
	}
	return set, bySource, nil
}

// changedNamespaces returns the namespaces whose policies differ between
// two sets (by policies compiled from: those given, and those gone), or
// nil, meaning all, when the root namespace's differ (they apply to
// every namespace).
func changedNamespaces(old, cur map[*v1alpha1.MeshPolicy]*cpolicy, rootNS string) map[string]bool {
	out := map[string]bool{}
	for _, m := range []struct {
		a, b map[*v1alpha1.MeshPolicy]*cpolicy
	}{{old, cur}, {cur, old}} {
		for src, p := range m.a {
			if _, ok := m.b[src]; ok {
				continue
			}
			if p.ns == rootNS {
				return nil
			}
			out[p.ns] = true
		}
	}
	return out
}

// selectFor returns the policies that apply to a workload of namespace ns
// with labels ls, in order.
func (set *policySet) selectFor(ns string, ls map[string]string) []*cpolicy {
	var out []*cpolicy
	lset := labels.Set(ls)
	pick := func(ps []*cpolicy) {
		for _, p := range ps {
			if p.selector == nil || p.selector.Matches(lset) {
				out = append(out, p)
			}
		}
	}
	pick(set.root)
	if ns != set.rootNS {
		pick(set.byNS[ns])
	}
	slices.SortFunc(out, func(a, b *cpolicy) int { return int(a.order - b.order) })
	return out
}

// view is what decisions read: a policy set joined with the workloads.
type view struct {
	set         *policySet
	opts        *Options
	td          spiffeid.TrustDomain
	defaultMTLS v1alpha1.MTLSMode
	byUID       map[string]wlRef
}

type wlRef struct {
	w   *workload.Workload
	ent *entry
}

// buildView joins set with the workloads of snap. With prev (the view it
// replaces) and changed (the namespaces whose policies changed since
// prev's set; nil: all), a workload of prev (the same object) in a
// namespace not in changed keeps its entry: the policies that select it,
// and their order, are the same.
func buildView(set *policySet, snap *workload.Snapshot, opts *Options, prev *view, changed map[string]bool) *view {
	ws := snap.Workloads()
	v := &view{
		set:         set,
		opts:        opts,
		td:          opts.TrustDomain,
		defaultMTLS: opts.DefaultMTLS,
		byUID:       make(map[string]wlRef, len(ws)),
	}
	// Workloads with the same namespace and labels share a selection, and
	// workloads with the same selection share an entry.
	byGroup := map[string]*entry{}
	bySel := map[string]*entry{}
	var key []byte
	var names []string
	for _, w := range ws {
		if prev != nil && changed != nil && !changed[w.Namespace] {
			if r, ok := prev.byUID[w.UID]; ok && r.w == w {
				v.byUID[w.UID] = r
				continue
			}
		}
		key = append(key[:0], w.Namespace...)
		names = slices.AppendSeq(names[:0], maps.Keys(w.Labels))
		slices.Sort(names)
		for _, k := range names {
			key = append(key, 0)
			key = append(key, k...)
			key = append(key, '=')
			key = append(key, w.Labels[k]...)
		}
		ent, ok := byGroup[string(key)]
		if !ok {
			sel := set.selectFor(w.Namespace, w.Labels)
			var sk []byte
			for _, p := range sel {
				sk = strconv.AppendInt(sk, int64(p.order), 36)
				sk = append(sk, ',')
			}
			if ent, ok = bySel[string(sk)]; !ok {
				ent = newEntry(sel, opts)
				bySel[string(sk)] = ent
			}
			byGroup[string(key)] = ent
		}
		v.byUID[w.UID] = wlRef{w: w, ent: ent}
	}
	return v
}

// lookup returns the entry of w: precomputed when the view knows w with the
// same namespace and labels, else computed now (allocating).
func (v *view) lookup(w *workload.Workload) *entry {
	if r, ok := v.byUID[w.UID]; ok && (r.w == w || (r.w.Namespace == w.Namespace && maps.Equal(r.w.Labels, w.Labels))) {
		return r.ent
	}
	return newEntry(v.set.selectFor(w.Namespace, w.Labels), v.opts)
}

// entry is everything decisions need about one destination workload: the
// rules of the policies that select it, indexed by action and source key.
type entry struct {
	deny, allow, audit index
	hasAllow           bool
	defaultDeny        bool
	mtls               v1alpha1.MTLSMode
	mtlsPolicy         string
	rate               RateLimit
	hasRate            bool
}

func newEntry(sel []*cpolicy, opts *Options) *entry {
	e := &entry{defaultDeny: opts.DefaultDeny, mtls: opts.DefaultMTLS}
	mtlsLevel, rateLevel := -1, -1
	for _, p := range sel {
		var ix *index
		switch p.action {
		case v1alpha1.ActionDeny:
			ix = &e.deny
		case v1alpha1.ActionAllow:
			ix = &e.allow
			e.hasAllow = true
		case v1alpha1.ActionAudit:
			ix = &e.audit
		}
		if ix != nil {
			for ri := range p.rules {
				r := &p.rules[ri]
				if len(r.from) == 0 {
					ix.rest = append(ix.rest, ref{p: p, rule: int32(ri), clause: -1})
					continue
				}
				for ci := range r.from {
					ix.add(ref{p: p, rule: int32(ri), clause: int32(ci)}, &r.from[ci])
				}
			}
		}
		if p.deny {
			e.defaultDeny = true
		}
		if p.mtls != "" {
			l := p.level()
			if l > mtlsLevel || (l == mtlsLevel && p.mtls == v1alpha1.MTLSStrict && e.mtls != v1alpha1.MTLSStrict) {
				e.mtls, e.mtlsPolicy, mtlsLevel = p.mtls, p.key, l
			}
		}
		if p.rate != nil {
			l := p.level()
			switch {
			case l > rateLevel:
				e.rate = RateLimit{ConnectionsPerSecond: p.rate.ConnectionsPerSecond, Burst: p.rate.Burst, MaxConnections: p.rate.MaxConnections, Policy: p.key}
				rateLevel = l
			case l == rateLevel:
				e.rate.ConnectionsPerSecond = minSet(e.rate.ConnectionsPerSecond, p.rate.ConnectionsPerSecond)
				e.rate.Burst = minSet(e.rate.Burst, p.rate.Burst)
				e.rate.MaxConnections = minSet(e.rate.MaxConnections, p.rate.MaxConnections)
			}
			e.hasRate = true
		}
	}
	if e.hasRate && e.rate.Burst == 0 {
		e.rate.Burst = e.rate.ConnectionsPerSecond
	}
	return e
}

// minSet returns the smaller of two limits where 0 means unset.
func minSet(a, b int32) int32 {
	switch {
	case a == 0:
		return b
	case b == 0:
		return a
	}
	return min(a, b)
}

// ref names one clause of one rule of one policy (clause -1: the rule has
// no from and matches every source).
type ref struct {
	p            *cpolicy
	rule, clause int32
}

func (a ref) less(b ref) bool {
	if a.p.order != b.p.order {
		return a.p.order < b.p.order
	}
	if a.rule != b.rule {
		return a.rule < b.rule
	}
	return a.clause < b.clause
}

func (a ref) match(s *source, port uint16) bool {
	r := &a.p.rules[a.rule]
	if !r.portMatch(port) {
		return false
	}
	return a.clause < 0 || r.from[a.clause].match(s)
}

// index buckets the clauses of one action by a key the source must have
// for the clause to match: an exact principal, else a namespace, else a
// service account. Clauses with none of these (wildcards, IP blocks, not
// forms only, rules without from) are in rest. Each list is sorted by
// (policy order, rule, clause) because refs are added in that order.
type index struct {
	byPrincipal map[string][]ref
	byNS        map[string][]ref
	bySA        map[saKey][]ref
	rest        []ref
}

func (ix *index) add(r ref, c *clause) {
	exact := len(c.principals) > 0
	for _, m := range c.principals {
		exact = exact && m.kind == matchExact
	}
	switch {
	case exact:
		if ix.byPrincipal == nil {
			ix.byPrincipal = map[string][]ref{}
		}
		for _, m := range c.principals {
			ix.byPrincipal[m.s] = appendRef(ix.byPrincipal[m.s], r)
		}
	case len(c.namespaces) > 0:
		if ix.byNS == nil {
			ix.byNS = map[string][]ref{}
		}
		for _, ns := range c.namespaces {
			ix.byNS[ns] = appendRef(ix.byNS[ns], r)
		}
	case len(c.sas) > 0:
		if ix.bySA == nil {
			ix.bySA = map[saKey][]ref{}
		}
		for _, k := range c.sas {
			ix.bySA[k] = appendRef(ix.bySA[k], r)
		}
	default:
		ix.rest = append(ix.rest, r)
	}
}

// appendRef appends r unless it is already last (a key listed twice).
func appendRef(rs []ref, r ref) []ref {
	if n := len(rs); n > 0 && rs[n-1] == r {
		return rs
	}
	return append(rs, r)
}

// cursor merges the candidate lists of one source in ref order.
type cursor [4][]ref

func (ix *index) cursor(s *source) cursor {
	var c cursor
	if s.id != "" {
		c[0] = ix.byPrincipal[s.id]
	}
	if s.ns != "" {
		c[1] = ix.byNS[s.ns]
	}
	if s.sa != "" {
		c[2] = ix.bySA[saKey{s.ns, s.sa}]
	}
	c[3] = ix.rest
	return c
}

func (c *cursor) next() (ref, bool) {
	best := -1
	for i := range c {
		if len(c[i]) > 0 && (best < 0 || c[i][0].less(c[best][0])) {
			best = i
		}
	}
	if best < 0 {
		return ref{}, false
	}
	r := c[best][0]
	c[best] = c[best][1:]
	return r, true
}

// first returns the first (by policy order, rule) ref matching the source.
func (ix *index) first(s *source, port uint16) (ref, bool) {
	c := ix.cursor(s)
	for {
		r, ok := c.next()
		if !ok || r.match(s, port) {
			return r, ok
		}
	}
}

// audit records in d every policy with a matching ref.
func (ix *index) audit(s *source, port uint16, d *Decision) {
	c := ix.cursor(s)
	var last *cpolicy
	for {
		r, ok := c.next()
		if !ok {
			return
		}
		if r.p == last || !r.match(s, port) {
			continue
		}
		if d.AuditCount < MaxAuditHits {
			d.Audit[d.AuditCount] = AuditHit{Policy: r.p.key, Rule: int(r.rule)}
		}
		d.AuditCount++
		last = r.p
	}
}
