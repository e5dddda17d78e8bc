package file

import (
	corev1 "k8s.io/api/core/v1"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// Objects are Kubernetes objects as a source other than the file reads
// them (the Kubernetes source, from the API server's informers).
type Objects struct {
	Namespaces []*corev1.Namespace
	Nodes      []*corev1.Node
	Pods       []*Pod
	Services   []*corev1.Service
	// Endpoints, when not nil, gives each service's ready endpoints (pod
	// UIDs), keyed "namespace/name", as EndpointSlices say; a service then
	// resolves to those instead of the pods its selector matches.
	Endpoints map[string][]string
	// Policies are MeshPolicies, each already validated.
	Policies []*v1alpha1.MeshPolicy
	// Cache, if not nil, carries the workloads made of pods from this
	// build to the next (see PodCache): Pods must then never be changed
	// once given to a build, only replaced.
	Cache *PodCache
}

// BuildObjects turns objects read from an API server into a Manifest by
// the same rules as a file, with one difference: the API server already
// validated every object, and a cluster must not lose its mesh because of
// one odd object, so a problem drops the object it is about (and is
// returned in Manifest.Warnings) instead of the whole state. origin names
// the source in messages ("kubernetes").
func BuildObjects(origin string, objs Objects) *Manifest {
	p := &parser{file: origin, lenient: true, endpoints: objs.Endpoints, cache: objs.Cache}
	if objs.Endpoints != nil {
		p.podByUID = make(map[string]indexedPod, len(objs.Pods))
	}
	loc := func(kind, ns, name string) Location {
		return Location{File: origin, Kind: kind, Namespace: ns, Name: name}
	}
	for _, o := range objs.Namespaces {
		p.namespaces = append(p.namespaces, located[corev1.Namespace]{loc("Namespace", "", o.Name), o})
	}
	for _, o := range objs.Nodes {
		p.nodes = append(p.nodes, located[corev1.Node]{loc("Node", "", o.Name), o})
	}
	p.pods = make([]located[Pod], 0, len(objs.Pods))
	p.services = make([]located[corev1.Service], 0, len(objs.Services))
	p.extra = make([]Extra, 0, len(objs.Policies))
	for _, o := range objs.Pods {
		p.pods = append(p.pods, located[Pod]{loc("Pod", o.Namespace, o.Name), o})
	}
	for _, o := range objs.Services {
		p.services = append(p.services, located[corev1.Service]{loc("Service", o.Namespace, o.Name), o})
	}
	for _, pol := range objs.Policies {
		p.extra = append(p.extra, Extra{Loc: loc(v1alpha1.Kind, pol.Namespace, pol.Name), Kind: policyKind, Value: pol})
	}
	return p.build()
}
