package policy

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// ErrInvalid is wrapped by every validation error: Validate's, Parse's and
// the errors of (*Engine).Update.
var ErrInvalid = errors.New("invalid MeshPolicy")

// FieldError is one problem with one field of a MeshPolicy.
type FieldError struct {
	// Path is the field, e.g. spec.rules[1].from[0].ipBlocks[0].cidr.
	Path string
	// Msg says what is wrong and what would be valid.
	Msg string
}

func (f FieldError) String() string { return f.Path + ": " + f.Msg }

// ValidationError lists every problem found in one MeshPolicy.
type ValidationError struct {
	Namespace, Name string
	Fields          []FieldError
}

// Error names the object and lists each field with its problem, e.g.
//
//	MeshPolicy shop/pay: spec.action: "PERMIT" is not an action; want ALLOW, DENY or AUDIT
func (e *ValidationError) Error() string {
	var b strings.Builder
	b.WriteString("MeshPolicy ")
	b.WriteString(e.Namespace)
	b.WriteByte('/')
	b.WriteString(e.Name)
	b.WriteString(": ")
	for i, f := range e.Fields {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(f.String())
	}
	return b.String()
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// Validate checks one MeshPolicy and returns nil or a *ValidationError
// listing every problem (it wraps ErrInvalid).
func Validate(p *v1alpha1.MeshPolicy) error {
	if _, err := compilePolicy(p); err != nil {
		return err
	}
	return nil
}

// checker collects the field errors of one policy.
type checker struct {
	errs []FieldError
}

func (c *checker) add(path, format string, args ...any) {
	c.errs = append(c.errs, FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

// atMost checks the length of a list against one of the limits of
// package v1alpha1 (the CRD's maxItems).
func (c *checker) atMost(path string, n, limit int) {
	if n > limit {
		c.add(path, "%d entries; want at most %d", n, limit)
	}
}

const (
	wantAction    = "want ALLOW, DENY or AUDIT"
	wantMTLS      = "want STRICT or PERMISSIVE"
	wantPrincipal = "want a SPIFFE ID such as spiffe://cluster.local/ns/shop/sa/checkout, \"*\", a prefix ending in \"*\" or a suffix starting with \"*\""
	wantPort      = "want a port 1-65535 or a range \"low-high\" such as \"9000-9100\""
	wantOperator  = "want In, NotIn, Exists or DoesNotExist"
)

func (c *checker) name(path, kind, s string, label bool) {
	var problems []string
	if label {
		problems = validation.IsDNS1123Label(s)
	} else {
		problems = validation.IsDNS1123Subdomain(s)
	}
	if len(problems) > 0 {
		c.add(path, "%q is not a valid %s: %s", s, kind, problems[0])
	}
}

func (c *checker) metadata(p *v1alpha1.MeshPolicy) {
	if p.Name == "" {
		c.add("metadata.name", "required")
	} else {
		c.name("metadata.name", "name", p.Name, false)
	}
	if p.Namespace == "" {
		c.add("metadata.namespace", "required (MeshPolicy is namespaced)")
	} else {
		c.name("metadata.namespace", "namespace", p.Namespace, true)
	}
}

// selector checks spec.selector field by field, reporting every problem,
// and returns it compiled (nil when it is empty or invalid).
func (c *checker) selector(sel *metav1.LabelSelector) labels.Selector {
	if sel == nil || (len(sel.MatchLabels) == 0 && len(sel.MatchExpressions) == 0) {
		return nil
	}
	before := len(c.errs)
	for _, k := range slices.Sorted(maps.Keys(sel.MatchLabels)) {
		path := fmt.Sprintf("spec.selector.matchLabels[%q]", k)
		c.labelKey(path, k)
		c.labelValue(path, sel.MatchLabels[k])
	}
	for i, e := range sel.MatchExpressions {
		path := fmt.Sprintf("spec.selector.matchExpressions[%d]", i)
		c.labelKey(path+".key", e.Key)
		switch e.Operator {
		case metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn:
			if len(e.Values) == 0 {
				c.add(path+".values", "empty; operator %s needs at least one value", e.Operator)
			}
			for j, v := range e.Values {
				c.labelValue(fmt.Sprintf("%s.values[%d]", path, j), v)
			}
		case metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist:
			if len(e.Values) > 0 {
				c.add(path+".values", "must be empty for operator %s", e.Operator)
			}
		default:
			c.add(path+".operator", "%q is not an operator; %s", e.Operator, wantOperator)
		}
	}
	if len(c.errs) > before {
		return nil
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		c.add("spec.selector", "%v", err)
		return nil
	}
	return s
}

func (c *checker) labelKey(path, k string) {
	if problems := validation.IsQualifiedName(k); len(problems) > 0 {
		c.add(path, "%q is not a valid label key: %s", k, problems[0])
	}
}

func (c *checker) labelValue(path, v string) {
	if problems := validation.IsValidLabelValue(v); len(problems) > 0 {
		c.add(path, "%q is not a valid label value: %s", v, problems[0])
	}
}

func (c *checker) principal(path, s string) principalMatcher {
	switch n := strings.Count(s, "*"); {
	case s == "":
		c.add(path, "empty; %s", wantPrincipal)
	case s == "*":
		return principalMatcher{kind: matchAny}
	case n > 1:
		c.add(path, "%q has more than one \"*\"; %s", s, wantPrincipal)
	case n == 1 && strings.HasSuffix(s, "*"):
		prefix := s[:len(s)-1]
		if !strings.HasPrefix(prefix, "spiffe://") {
			c.add(path, "%q: a prefix must start with spiffe://; %s", s, wantPrincipal)
			break
		}
		return principalMatcher{kind: matchPrefix, s: prefix}
	case n == 1 && strings.HasPrefix(s, "*"):
		return principalMatcher{kind: matchSuffix, s: s[1:]}
	case n == 1:
		c.add(path, "%q has \"*\" in the middle; %s", s, wantPrincipal)
	default:
		id, err := spiffeid.FromString(s)
		if err != nil {
			c.add(path, "%q is not a SPIFFE ID (%v); %s", s, err, wantPrincipal)
			break
		}
		return principalMatcher{kind: matchExact, s: id.String()}
	}
	return principalMatcher{kind: matchNone}
}

func (c *checker) serviceAccount(path, policyNS, s string) saKey {
	ns, name, found := strings.Cut(s, "/")
	if !found {
		ns, name = policyNS, s
	}
	if s == "" || name == "" || (found && ns == "") || strings.Contains(name, "/") {
		c.add(path, "%q is not a service account; want \"name\" (in the policy's namespace) or \"namespace/name\"", s)
		return saKey{}
	}
	if found {
		c.name(path, "namespace", ns, true)
	}
	c.name(path, "service account name", name, false)
	return saKey{ns: ns, name: name}
}

func (c *checker) cidr(path, s string) (netip.Prefix, bool) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		c.add(path, "%q is not a CIDR; want an address and prefix length such as 10.0.0.0/8 or fd00::/8", s)
		return netip.Prefix{}, false
	}
	if p.Addr().Is4In6() {
		c.add(path, "%q is an IPv4-mapped IPv6 prefix; write it as IPv4, e.g. %s", s, netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)).Masked())
		return netip.Prefix{}, false
	}
	if p.Addr().Zone() != "" {
		c.add(path, "%q has a zone; want a CIDR without %%zone", s)
		return netip.Prefix{}, false
	}
	if m := p.Masked(); m != p {
		c.add(path, "%q has host bits set; want %s", s, m)
		return netip.Prefix{}, false
	}
	return p, true
}

func (c *checker) ipBlock(path string, b *v1alpha1.IPBlock) ipBlock {
	out := ipBlock{}
	cidr, ok := c.cidr(path+".cidr", b.CIDR)
	out.cidr = cidr
	c.atMost(path+".except", len(b.Except), v1alpha1.MaxExcepts)
	for i, e := range b.Except {
		ep := fmt.Sprintf("%s.except[%d]", path, i)
		ex, eok := c.cidr(ep, e)
		if !eok || !ok {
			continue
		}
		if ex.Addr().Is4() != cidr.Addr().Is4() || ex.Bits() < cidr.Bits() || !cidr.Contains(ex.Addr()) {
			c.add(ep, "%s is not inside cidr %s; want a sub-range of it", ex, cidr)
			continue
		}
		out.except = append(out.except, ex)
	}
	return out
}

func (c *checker) port(path string, v intstr.IntOrString) portRange {
	if v.Type == intstr.Int {
		if v.IntVal < 1 || v.IntVal > 65535 {
			c.add(path, "%d is out of range; %s", v.IntVal, wantPort)
			return portRange{}
		}
		return portRange{lo: uint16(v.IntVal), hi: uint16(v.IntVal)}
	}
	s := v.StrVal
	if len(s) > v1alpha1.MaxPortLength {
		c.add(path, "%q is longer than %d characters; %s", s, v1alpha1.MaxPortLength, wantPort)
		return portRange{}
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h, err2 := strconv.ParseUint(hi, 10, 16)
	switch {
	case err1 != nil || err2 != nil:
		c.add(path, "%q is not a port or range; %s", s, wantPort)
	case l < 1 || h < 1:
		c.add(path, "%q is out of range; %s", s, wantPort)
	case l > h:
		c.add(path, "%q is an empty range (low > high); %s", s, wantPort)
	default:
		return portRange{lo: uint16(l), hi: uint16(h)}
	}
	return portRange{}
}
