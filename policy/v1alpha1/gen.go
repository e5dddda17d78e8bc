package v1alpha1

// The deep-copy methods (zz_generated.deepcopy.go) and the
// CustomResourceDefinition in the Helm chart's crds/ folder are generated
// from the types and their +kubebuilder markers by controller-gen, pinned
// in go.mod's tool block, so that `make generate` reproduces both byte for
// byte (CI checks it with `make check-generate`).
//go:generate go tool controller-gen object paths=. crd output:crd:artifacts:config=../../deploy/charts/mantlet/crds
