// Package v1alpha1 holds the MeshPolicy API types, group mantlet.io,
// version v1alpha1: Go types in the usual Kubernetes shape (metadata, spec,
// status) with hand-written deep-copy methods and scheme registration, so
// the standalone YAML loader and a CustomResourceDefinition decode the same
// objects. Package policy validates and compiles them.
package v1alpha1
