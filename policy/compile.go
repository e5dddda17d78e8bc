package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// The compiled form of one MeshPolicy: strings parsed, ranges sorted, a
// rank (order) that fixes a deterministic precedence among policies.

type matchKind uint8

const (
	matchNone matchKind = iota // invalid input; never matches
	matchExact
	matchAny
	matchPrefix
	matchSuffix
)

type principalMatcher struct {
	kind matchKind
	s    string
}

// match reports whether the SPIFFE ID id matches; the empty id (no
// authenticated source) matches nothing.
func (m principalMatcher) match(id string) bool {
	if id == "" {
		return false
	}
	switch m.kind {
	case matchExact:
		return id == m.s
	case matchAny:
		return true
	case matchPrefix:
		return strings.HasPrefix(id, m.s)
	case matchSuffix:
		return strings.HasSuffix(id, m.s)
	}
	return false
}

type saKey struct{ ns, name string }

type portRange struct{ lo, hi uint16 }

type ipBlock struct {
	cidr   netip.Prefix
	except []netip.Prefix
}

func (b *ipBlock) contains(a netip.Addr) bool {
	if !b.cidr.Contains(a) {
		return false
	}
	for _, e := range b.except {
		if e.Contains(a) {
			return false
		}
	}
	return true
}

// clause is one entry of a rule's from list.
type clause struct {
	principals, notPrincipals []principalMatcher
	namespaces, notNamespaces []string
	sas, notSAs               []saKey
	ipBlocks, notIPBlocks     []ipBlock
}

type rule struct {
	from            []clause // empty: every source
	ports, notPorts []portRange
}

type cpolicy struct {
	ns, name string
	key      string // ns/name, reported in decisions
	order    int32  // rank in the set, sorted by key
	action   v1alpha1.Action
	selector labels.Selector // nil selects every workload
	root     bool            // in the mesh root namespace
	mtls     v1alpha1.MTLSMode
	rate     *v1alpha1.RateLimit
	deny     bool // spec.defaultDeny
	rules    []rule
}

// level orders policies by specificity for mtls and rateLimit: a selector
// in the workload's own namespace beats namespace-wide, which beats the
// root namespace with, then without, a selector.
func (p *cpolicy) level() int {
	l := 0
	if !p.root {
		l = 2
	}
	if p.selector != nil {
		l++
	}
	return l
}

// source is the source side of a connection as rules see it.
type source struct {
	id     string // SPIFFE ID; "" for plaintext
	ns, sa string // from the ID; "" when unknown
	ip     netip.Addr
}

func (c *clause) match(s *source) bool {
	if len(c.principals) > 0 && !anyPrincipal(c.principals, s.id) {
		return false
	}
	if len(c.notPrincipals) > 0 && anyPrincipal(c.notPrincipals, s.id) {
		return false
	}
	if len(c.namespaces) > 0 && (s.ns == "" || !slices.Contains(c.namespaces, s.ns)) {
		return false
	}
	if len(c.notNamespaces) > 0 && s.ns != "" && slices.Contains(c.notNamespaces, s.ns) {
		return false
	}
	if len(c.sas) > 0 && (s.sa == "" || !slices.Contains(c.sas, saKey{s.ns, s.sa})) {
		return false
	}
	if len(c.notSAs) > 0 && s.sa != "" && slices.Contains(c.notSAs, saKey{s.ns, s.sa}) {
		return false
	}
	if len(c.ipBlocks) > 0 && (!s.ip.IsValid() || !anyBlock(c.ipBlocks, s.ip)) {
		return false
	}
	if len(c.notIPBlocks) > 0 && s.ip.IsValid() && anyBlock(c.notIPBlocks, s.ip) {
		return false
	}
	return true
}

func anyPrincipal(ms []principalMatcher, id string) bool {
	for _, m := range ms {
		if m.match(id) {
			return true
		}
	}
	return false
}

func anyBlock(bs []ipBlock, a netip.Addr) bool {
	for i := range bs {
		if bs[i].contains(a) {
			return true
		}
	}
	return false
}

func inPorts(rs []portRange, port uint16) bool {
	for _, r := range rs {
		if port >= r.lo && port <= r.hi {
			return true
		}
	}
	return false
}

func (r *rule) portMatch(port uint16) bool {
	if len(r.ports) > 0 && !inPorts(r.ports, port) {
		return false
	}
	return len(r.notPorts) == 0 || !inPorts(r.notPorts, port)
}

// compilePolicy validates p and compiles it; on error it returns a
// *ValidationError with every problem found. The result's order and root
// are set by the caller.
func compilePolicy(p *v1alpha1.MeshPolicy) (*cpolicy, error) {
	c := &checker{}
	c.metadata(p)
	out := &cpolicy{
		ns:     p.Namespace,
		name:   p.Name,
		key:    p.Namespace + "/" + p.Name,
		action: p.Spec.Action,
		mtls:   p.Spec.MTLS,
		deny:   p.Spec.DefaultDeny,
	}
	spec := &p.Spec
	out.selector = c.selector(spec.Selector)
	switch spec.Action {
	case "":
		if len(spec.Rules) > 0 {
			c.add("spec.action", "required when spec.rules is set; %s", wantAction)
		} else if spec.MTLS == "" && spec.RateLimit == nil && !spec.DefaultDeny {
			c.add("spec", "sets nothing; want an action with rules, mtls, rateLimit or defaultDeny")
		}
	case v1alpha1.ActionAllow:
	case v1alpha1.ActionDeny, v1alpha1.ActionAudit:
		if len(spec.Rules) == 0 {
			c.add("spec.rules", "a %s policy without rules matches nothing; add a rule (rules: [{}] matches every connection)", spec.Action)
		}
	default:
		c.add("spec.action", "%q is not an action; %s", spec.Action, wantAction)
	}
	switch spec.MTLS {
	case "", v1alpha1.MTLSStrict, v1alpha1.MTLSPermissive:
	default:
		c.add("spec.mtls", "%q is not an mTLS mode; %s", spec.MTLS, wantMTLS)
	}
	if rl := spec.RateLimit; rl != nil {
		out.rate = rl.DeepCopy()
		for _, f := range []struct {
			name string
			v    int32
		}{{"connectionsPerSecond", rl.ConnectionsPerSecond}, {"burst", rl.Burst}, {"maxConnections", rl.MaxConnections}} {
			if f.v < 0 {
				c.add("spec.rateLimit."+f.name, "%d is negative; want a positive number, or leave it out", f.v)
			}
		}
		switch {
		case rl.Burst > 0 && rl.ConnectionsPerSecond == 0:
			c.add("spec.rateLimit.burst", "set without connectionsPerSecond; want both, or leave burst out")
		case rl.ConnectionsPerSecond == 0 && rl.MaxConnections == 0 && rl.Burst == 0:
			c.add("spec.rateLimit", "sets nothing; want connectionsPerSecond (and burst) or maxConnections")
		}
	}
	c.atMost("spec.rules", len(spec.Rules), v1alpha1.MaxRules)
	for i := range spec.Rules {
		out.rules = append(out.rules, c.rule(fmt.Sprintf("spec.rules[%d]", i), p.Namespace, &spec.Rules[i]))
	}
	if len(c.errs) > 0 {
		return nil, &ValidationError{Namespace: p.Namespace, Name: p.Name, Fields: c.errs}
	}
	return out, nil
}

func (c *checker) rule(path, policyNS string, r *v1alpha1.Rule) rule {
	var out rule
	c.atMost(path+".from", len(r.From), v1alpha1.MaxSources)
	for i := range r.From {
		out.from = append(out.from, c.clause(fmt.Sprintf("%s.from[%d]", path, i), policyNS, &r.From[i]))
	}
	if r.To != nil {
		if len(r.To.Ports) == 0 && len(r.To.NotPorts) == 0 {
			c.add(path+".to", "empty; want ports or notPorts, or leave to out to match every port")
		}
		c.atMost(path+".to.ports", len(r.To.Ports), v1alpha1.MaxPorts)
		c.atMost(path+".to.notPorts", len(r.To.NotPorts), v1alpha1.MaxPorts)
		for i, v := range r.To.Ports {
			out.ports = append(out.ports, c.port(fmt.Sprintf("%s.to.ports[%d]", path, i), v))
		}
		for i, v := range r.To.NotPorts {
			out.notPorts = append(out.notPorts, c.port(fmt.Sprintf("%s.to.notPorts[%d]", path, i), v))
		}
	}
	return out
}

func (c *checker) clause(path, policyNS string, s *v1alpha1.Source) clause {
	var out clause
	n := 0
	principals := func(field string, in []string) []principalMatcher {
		var ms []principalMatcher
		for i, v := range in {
			ms = append(ms, c.principal(fmt.Sprintf("%s.%s[%d]", path, field, i), v))
		}
		n += len(in)
		return ms
	}
	namespaces := func(field string, in []string) []string {
		for i, v := range in {
			c.name(fmt.Sprintf("%s.%s[%d]", path, field, i), "namespace", v, true)
		}
		n += len(in)
		return slices.Clone(in)
	}
	sas := func(field string, in []string) []saKey {
		var ks []saKey
		for i, v := range in {
			ks = append(ks, c.serviceAccount(fmt.Sprintf("%s.%s[%d]", path, field, i), policyNS, v))
		}
		n += len(in)
		return ks
	}
	blocks := func(field string, in []v1alpha1.IPBlock) []ipBlock {
		var bs []ipBlock
		c.atMost(path+"."+field, len(in), v1alpha1.MaxIPBlocks)
		for i := range in {
			bs = append(bs, c.ipBlock(fmt.Sprintf("%s.%s[%d]", path, field, i), &in[i]))
		}
		n += len(in)
		return bs
	}
	out.principals = principals("principals", s.Principals)
	out.notPrincipals = principals("notPrincipals", s.NotPrincipals)
	out.namespaces = namespaces("namespaces", s.Namespaces)
	out.notNamespaces = namespaces("notNamespaces", s.NotNamespaces)
	out.sas = sas("serviceAccounts", s.ServiceAccounts)
	out.notSAs = sas("notServiceAccounts", s.NotServiceAccounts)
	out.ipBlocks = blocks("ipBlocks", s.IPBlocks)
	out.notIPBlocks = blocks("notIpBlocks", s.NotIPBlocks)
	if n == 0 {
		c.add(path, "empty source; want at least one of principals, namespaces, serviceAccounts, ipBlocks or their not forms, or leave from out to match every source")
	}
	return out
}
