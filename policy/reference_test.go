package policy

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// This file evaluates policies the slow, obvious way, straight from the
// documented semantics and the API types, as an oracle for the compiled
// engine (TestDecide and the fuzz targets compare the two).

func reference(t testing.TB, policies []string, opts Options, in Input) Decision {
	t.Helper()
	var ps []*v1alpha1.MeshPolicy
	for _, s := range policies {
		ps = append(ps, pol(t, s))
	}
	return referenceDecide(ps, opts, in)
}

func referenceDecide(ps []*v1alpha1.MeshPolicy, opts Options, in Input) Decision {
	root := cmpOr(opts.RootNamespace, DefaultRootNamespace)
	td := opts.TrustDomain
	if td.IsZero() {
		td = spiffeid.RequireTrustDomainFromString("cluster.local")
	}
	d := Decision{Rule: -1}
	if in.Dst == nil {
		d.Allowed, d.Reason = true, ReasonNotMeshed
		return d
	}
	var sel []*v1alpha1.MeshPolicy
	for _, p := range ps {
		if p.Namespace != in.Dst.Namespace && p.Namespace != root {
			continue
		}
		if s := p.Spec.Selector; s != nil {
			ls, err := metav1.LabelSelectorAsSelector(s)
			if err != nil || !ls.Matches(labels.Set(in.Dst.Labels)) {
				continue
			}
		}
		sel = append(sel, p)
	}
	slices.SortFunc(sel, func(a, b *v1alpha1.MeshPolicy) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	var id, ns, sa string
	if in.MTLS {
		id, ns, sa = in.SrcID.String(), in.SrcNamespace, in.SrcServiceAccount
		if ns == "" && sa == "" && !in.SrcID.IsZero() && in.SrcID.MemberOf(td) {
			ns, sa, _ = identity.ParseWorkloadID(in.SrcID)
		}
	}
	ip := in.SrcIP.Unmap()
	firstRule := func(p *v1alpha1.MeshPolicy) int {
		for i, r := range p.Spec.Rules {
			if refRuleMatches(p.Namespace, &r, id, ns, sa, ip, in.DstPort) {
				return i
			}
		}
		return -1
	}
	// mTLS: the most specific level wins, STRICT wins a tie.
	mode, modePolicy, modeLevel := cmpOr(opts.DefaultMTLS, v1alpha1.MTLSPermissive), "", -1
	for _, p := range sel {
		if p.Spec.MTLS == "" {
			continue
		}
		l := 0
		if p.Namespace != root {
			l = 2
		}
		if s := p.Spec.Selector; s != nil && (len(s.MatchLabels) > 0 || len(s.MatchExpressions) > 0) {
			l++
		}
		if l > modeLevel || (l == modeLevel && p.Spec.MTLS == v1alpha1.MTLSStrict && mode != v1alpha1.MTLSStrict) {
			mode, modePolicy, modeLevel = p.Spec.MTLS, p.Namespace+"/"+p.Name, l
		}
	}
	for _, p := range sel {
		if p.Spec.Action == v1alpha1.ActionAudit {
			if r := firstRule(p); r >= 0 {
				if d.AuditCount < MaxAuditHits {
					d.Audit[d.AuditCount] = AuditHit{Policy: p.Namespace + "/" + p.Name, Rule: r}
				}
				d.AuditCount++
			}
		}
	}
	if !in.MTLS && mode == v1alpha1.MTLSStrict {
		d.Reason, d.Policy = ReasonPlaintextStrict, modePolicy
		return d
	}
	for _, p := range sel {
		if p.Spec.Action == v1alpha1.ActionDeny {
			if r := firstRule(p); r >= 0 {
				d.Reason, d.Action, d.Policy, d.Rule = ReasonDeniedByPolicy, v1alpha1.ActionDeny, p.Namespace+"/"+p.Name, r
				return d
			}
		}
	}
	hasAllow, defaultDeny := false, opts.DefaultDeny
	for _, p := range sel {
		hasAllow = hasAllow || p.Spec.Action == v1alpha1.ActionAllow
		defaultDeny = defaultDeny || p.Spec.DefaultDeny
	}
	if !hasAllow {
		if defaultDeny {
			d.Reason = ReasonDeniedByDefaultDeny
		} else {
			d.Allowed, d.Reason = true, ReasonAllowedByDefault
		}
		return d
	}
	for _, p := range sel {
		if p.Spec.Action == v1alpha1.ActionAllow {
			if r := firstRule(p); r >= 0 {
				d.Allowed, d.Reason, d.Action, d.Policy, d.Rule = true, ReasonAllowedByPolicy, v1alpha1.ActionAllow, p.Namespace+"/"+p.Name, r
				return d
			}
		}
	}
	d.Reason = ReasonNoAllowMatched
	return d
}

func cmpOr[T comparable](a, b T) T {
	var zero T
	if a != zero {
		return a
	}
	return b
}

func refRuleMatches(policyNS string, r *v1alpha1.Rule, id, ns, sa string, ip netip.Addr, port uint16) bool {
	if r.To != nil {
		if len(r.To.Ports) > 0 && !refPortIn(r.To.Ports, port) {
			return false
		}
		if refPortIn(r.To.NotPorts, port) {
			return false
		}
	}
	if len(r.From) == 0 {
		return true
	}
	for i := range r.From {
		if refSourceMatches(policyNS, &r.From[i], id, ns, sa, ip) {
			return true
		}
	}
	return false
}

func refSourceMatches(policyNS string, s *v1alpha1.Source, id, ns, sa string, ip netip.Addr) bool {
	principal := func(pats []string) bool {
		for _, p := range pats {
			if id == "" {
				return false
			}
			switch {
			case p == "*":
				return true
			case strings.HasSuffix(p, "*") && strings.HasPrefix(id, strings.TrimSuffix(p, "*")),
				strings.HasPrefix(p, "*") && strings.HasSuffix(id, strings.TrimPrefix(p, "*")),
				p == id:
				return true
			}
		}
		return false
	}
	namespace := func(list []string) bool { return ns != "" && slices.Contains(list, ns) }
	account := func(list []string) bool {
		for _, a := range list {
			if !strings.Contains(a, "/") {
				a = policyNS + "/" + a
			}
			if sa != "" && a == ns+"/"+sa {
				return true
			}
		}
		return false
	}
	block := func(list []v1alpha1.IPBlock) bool {
		for _, b := range list {
			if !ip.IsValid() || !netip.MustParsePrefix(b.CIDR).Contains(ip) {
				continue
			}
			excluded := false
			for _, e := range b.Except {
				excluded = excluded || netip.MustParsePrefix(e).Contains(ip)
			}
			if !excluded {
				return true
			}
		}
		return false
	}
	type field struct {
		set, match bool
	}
	for _, f := range []field{
		{len(s.Principals) > 0, principal(s.Principals)},
		{len(s.NotPrincipals) > 0, !principal(s.NotPrincipals)},
		{len(s.Namespaces) > 0, namespace(s.Namespaces)},
		{len(s.NotNamespaces) > 0, !namespace(s.NotNamespaces)},
		{len(s.ServiceAccounts) > 0, account(s.ServiceAccounts)},
		{len(s.NotServiceAccounts) > 0, !account(s.NotServiceAccounts)},
		{len(s.IPBlocks) > 0, block(s.IPBlocks)},
		{len(s.NotIPBlocks) > 0, !block(s.NotIPBlocks)},
	} {
		if f.set && !f.match {
			return false
		}
	}
	return true
}

func refPortIn(list []intstr.IntOrString, port uint16) bool {
	for _, v := range list {
		if v.Type == intstr.Int {
			if int(port) == int(v.IntVal) {
				return true
			}
			continue
		}
		lo, hi, ok := strings.Cut(v.StrVal, "-")
		if !ok {
			hi = lo
		}
		l, _ := strconv.Atoi(lo)
		h, _ := strconv.Atoi(hi)
		if int(port) >= l && int(port) <= h {
			return true
		}
	}
	return false
}
