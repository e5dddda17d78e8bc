package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The deep-copy methods are written by hand, in the shape deepcopy-gen
// would produce; TestDeepCopy checks that a copy shares no memory.

// DeepCopyInto copies p into out.
func (p *MeshPolicy) DeepCopyInto(out *MeshPolicy) {
	*out = *p
	out.TypeMeta = p.TypeMeta
	p.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	p.Spec.DeepCopyInto(&out.Spec)
	p.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy of p.
func (p *MeshPolicy) DeepCopy() *MeshPolicy {
	if p == nil {
		return nil
	}
	out := new(MeshPolicy)
	p.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (p *MeshPolicy) DeepCopyObject() runtime.Object {
	if c := p.DeepCopy(); c != nil {
		return c
	}
	return nil
}

// DeepCopyInto copies l into out.
func (l *MeshPolicyList) DeepCopyInto(out *MeshPolicyList) {
	*out = *l
	out.TypeMeta = l.TypeMeta
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]MeshPolicy, len(l.Items))
		for i := range l.Items {
			l.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
}

// DeepCopy returns a deep copy of l.
func (l *MeshPolicyList) DeepCopy() *MeshPolicyList {
	if l == nil {
		return nil
	}
	out := new(MeshPolicyList)
	l.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (l *MeshPolicyList) DeepCopyObject() runtime.Object {
	if c := l.DeepCopy(); c != nil {
		return c
	}
	return nil
}

// DeepCopyInto copies s into out.
func (s *MeshPolicySpec) DeepCopyInto(out *MeshPolicySpec) {
	*out = *s
	if s.Selector != nil {
		out.Selector = s.Selector.DeepCopy()
	}
	if s.Rules != nil {
		out.Rules = make([]Rule, len(s.Rules))
		for i := range s.Rules {
			s.Rules[i].DeepCopyInto(&out.Rules[i])
		}
	}
	if s.RateLimit != nil {
		rl := *s.RateLimit
		out.RateLimit = &rl
	}
}

// DeepCopy returns a deep copy of s.
func (s *MeshPolicySpec) DeepCopy() *MeshPolicySpec {
	if s == nil {
		return nil
	}
	out := new(MeshPolicySpec)
	s.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies r into out.
func (r *Rule) DeepCopyInto(out *Rule) {
	*out = *r
	if r.From != nil {
		out.From = make([]Source, len(r.From))
		for i := range r.From {
			r.From[i].DeepCopyInto(&out.From[i])
		}
	}
	if r.To != nil {
		out.To = r.To.DeepCopy()
	}
}

// DeepCopy returns a deep copy of r.
func (r *Rule) DeepCopy() *Rule {
	if r == nil {
		return nil
	}
	out := new(Rule)
	r.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies s into out.
func (s *Source) DeepCopyInto(out *Source) {
	*out = *s
	out.Principals = cloneStrings(s.Principals)
	out.NotPrincipals = cloneStrings(s.NotPrincipals)
	out.Namespaces = cloneStrings(s.Namespaces)
	out.NotNamespaces = cloneStrings(s.NotNamespaces)
	out.ServiceAccounts = cloneStrings(s.ServiceAccounts)
	out.NotServiceAccounts = cloneStrings(s.NotServiceAccounts)
	out.IPBlocks = cloneBlocks(s.IPBlocks)
	out.NotIPBlocks = cloneBlocks(s.NotIPBlocks)
}

// DeepCopy returns a deep copy of s.
func (s *Source) DeepCopy() *Source {
	if s == nil {
		return nil
	}
	out := new(Source)
	s.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies b into out.
func (b *IPBlock) DeepCopyInto(out *IPBlock) {
	*out = *b
	out.Except = cloneStrings(b.Except)
}

// DeepCopy returns a deep copy of b.
func (b *IPBlock) DeepCopy() *IPBlock {
	if b == nil {
		return nil
	}
	out := new(IPBlock)
	b.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies d into out.
func (d *Destination) DeepCopyInto(out *Destination) {
	*out = *d
	out.Ports = clonePorts(d.Ports)
	out.NotPorts = clonePorts(d.NotPorts)
}

// DeepCopy returns a deep copy of d.
func (d *Destination) DeepCopy() *Destination {
	if d == nil {
		return nil
	}
	out := new(Destination)
	d.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies r into out.
func (r *RateLimit) DeepCopyInto(out *RateLimit) { *out = *r }

// DeepCopy returns a deep copy of r.
func (r *RateLimit) DeepCopy() *RateLimit {
	if r == nil {
		return nil
	}
	out := new(RateLimit)
	r.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies s into out.
func (s *MeshPolicyStatus) DeepCopyInto(out *MeshPolicyStatus) {
	*out = *s
	if s.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(s.Conditions))
		for i := range s.Conditions {
			s.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
}

// DeepCopy returns a deep copy of s.
func (s *MeshPolicyStatus) DeepCopy() *MeshPolicyStatus {
	if s == nil {
		return nil
	}
	out := new(MeshPolicyStatus)
	s.DeepCopyInto(out)
	return out
}

func cloneStrings(in []string) []string {
	if in == nil {
		return nil
	}
	return append(make([]string, 0, len(in)), in...)
}

func cloneBlocks(in []IPBlock) []IPBlock {
	if in == nil {
		return nil
	}
	out := make([]IPBlock, len(in))
	for i := range in {
		in[i].DeepCopyInto(&out[i])
	}
	return out
}

func clonePorts(in []intstr.IntOrString) []intstr.IntOrString {
	if in == nil {
		return nil
	}
	return append(make([]intstr.IntOrString, 0, len(in)), in...)
}
