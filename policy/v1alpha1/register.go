package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of mantlet's resources.
const GroupName = "mantlet.io"

// Kind is the kind of a MeshPolicy object; ListKind that of a list of them.
const (
	Kind     = "MeshPolicy"
	ListKind = "MeshPolicyList"
)

// SchemeGroupVersion is the group and version of the types in this package.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: "v1alpha1"}

var (
	// SchemeBuilder registers the types of this package with a scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds MeshPolicy and MeshPolicyList to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// Resource returns the group-qualified resource for resource, e.g.
// "meshpolicies.mantlet.io".
func Resource(resource string) schema.GroupResource {
	return SchemeGroupVersion.WithResource(resource).GroupResource()
}

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &MeshPolicy{}, &MeshPolicyList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}
