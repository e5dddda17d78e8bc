// Package v1alpha1 holds the MeshPolicy API types, group mantlet.io,
// version v1alpha1: Go types in the usual Kubernetes shape (metadata, spec,
// status) with scheme registration, so the standalone YAML loader and the
// Kubernetes API decode the same objects. The deep-copy methods and the
// CustomResourceDefinition are generated from these types by controller-gen
// (see gen.go); their +kubebuilder markers are the CRD's schema, validation
// rules and printer columns. Package policy validates and compiles them.
//
// +kubebuilder:object:generate=true
// +groupName=mantlet.io
package v1alpha1
