package file

import (
	"errors"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// AnnotationPolicyName names the policy Policies makes for a namespace's
// mantlet.io/mtls annotation. A MeshPolicy of the same namespace and name
// in the file takes its place.
const AnnotationPolicyName = "mtls-annotation.mantlet.io"

// PolicyKinds registers MeshPolicy (mantlet.io) with the cluster file's
// parser (Options.Kinds): each MeshPolicy document is decoded
// strictly and validated, and any problem makes the whole file invalid,
// so the watcher keeps the last good file — policies and workloads — in
// force and logs the problem with the file, document, object and field.
func PolicyKinds() map[schema.GroupKind]KindDecoder {
	return map[schema.GroupKind]KindDecoder{policyKind: decodePolicy}
}

var policyKind = schema.GroupKind{Group: v1alpha1.GroupName, Kind: v1alpha1.Kind}

func decodePolicy(obj *Object) (any, error) {
	p, err := policy.ParseDocument(obj.JSON)
	if err != nil {
		// The location already names the object: keep only the fields.
		var ve *policy.ValidationError
		if errors.As(err, &ve) {
			parts := make([]string, len(ve.Fields))
			for i, f := range ve.Fields {
				parts[i] = f.String()
			}
			return nil, errors.New(strings.Join(parts, "; "))
		}
		return nil, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), policy.ErrInvalid.Error()+": "))
	}
	return p, nil
}

// Policies returns the policy set a parsed cluster file asks for: its
// MeshPolicy objects (registered with PolicyKinds), in file order, and,
// for every namespace annotated mantlet.io/mtls, a policy named
// AnnotationPolicyName that sets that namespace's mode (namespace-wide,
// no selector, no action). The annotation therefore ranks with
// namespace-wide policies: above the mesh-wide default of the root
// namespace and the agent's --mtls-mode, below policies with a selector;
// STRICT wins a tie with another namespace-wide policy.
func Policies(m *Manifest) []*v1alpha1.MeshPolicy {
	var out []*v1alpha1.MeshPolicy
	have := map[string]bool{}
	for _, x := range m.Extra {
		if p, ok := x.Value.(*v1alpha1.MeshPolicy); ok {
			out = append(out, p)
			have[p.Namespace+"/"+p.Name] = true
		}
	}
	for ns, mm := range m.MTLS {
		if mm == v1alpha1.MTLSUnset || have[ns+"/"+AnnotationPolicyName] {
			continue
		}
		out = append(out, &v1alpha1.MeshPolicy{
			TypeMeta:   metav1.TypeMeta{APIVersion: policy.APIVersion, Kind: v1alpha1.Kind},
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: AnnotationPolicyName},
			Spec:       v1alpha1.MeshPolicySpec{MTLS: mm},
		})
	}
	return out
}
