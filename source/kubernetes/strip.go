package kubernetes

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"

	"github.com/mantlet/mantlet/source/file"
)

// strip is the informers' transform: each cache keeps, of every object,
// only what the state's builder (source/file), the write-back (report.go)
// and onUpdate read, in place of what the API server sends (managed
// fields, annotations such as kubectl's last-applied configuration, a
// node's image list, an EndpointSlice's addresses and topology). Other
// objects pass unchanged.
func strip(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return stripPod(o), nil
	case *corev1.Namespace:
		return &corev1.Namespace{ObjectMeta: keptMeta(o.ObjectMeta), Status: corev1.NamespaceStatus{Phase: o.Status.Phase}}, nil
	case *corev1.Node:
		return &corev1.Node{ObjectMeta: keptMeta(o.ObjectMeta), Status: corev1.NodeStatus{Addresses: o.Status.Addresses}}, nil
	case *corev1.Service:
		return &corev1.Service{ObjectMeta: keptMeta(o.ObjectMeta), Spec: corev1.ServiceSpec{Type: o.Spec.Type,
			ClusterIP: o.Spec.ClusterIP, ClusterIPs: o.Spec.ClusterIPs, Selector: o.Spec.Selector, Ports: o.Spec.Ports}}, nil
	case *discoveryv1.EndpointSlice:
		return stripSlice(o), nil
	case *unstructured.Unstructured:
		// A MeshPolicy: its spec is decoded (and validated) once per
		// generation, its status read by the write-back.
		unstructured.RemoveNestedField(o.Object, "metadata", "managedFields")
		if ann := meshAnnotations(o.GetAnnotations()); len(ann) != len(o.GetAnnotations()) {
			o.SetAnnotations(ann)
		}
		return o, nil
	}
	return obj, nil
}

// keptMeta is the metadata mantlet reads: names, UID, resource version
// (onUpdate compares it), and the mantlet.io annotations.
func keptMeta(m metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID, ResourceVersion: m.ResourceVersion,
		Generation: m.Generation, Annotations: meshAnnotations(m.Annotations)}
}

// stripSlice keeps of an EndpointSlice its service's name and, of each
// endpoint, whether it is ready and which pod it is (readyEndpoints).
func stripSlice(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{ObjectMeta: keptMeta(s.ObjectMeta), AddressType: s.AddressType}
	if svc, ok := s.Labels[discoveryv1.LabelServiceName]; ok {
		out.Labels = map[string]string{discoveryv1.LabelServiceName: svc}
	}
	out.Endpoints = make([]discoveryv1.Endpoint, 0, len(s.Endpoints))
	for _, ep := range s.Endpoints {
		e := discoveryv1.Endpoint{Conditions: discoveryv1.EndpointConditions{Ready: ep.Conditions.Ready}}
		if ep.TargetRef != nil {
			e.TargetRef = &corev1.ObjectReference{Kind: ep.TargetRef.Kind, UID: ep.TargetRef.UID}
		}
		out.Endpoints = append(out.Endpoints, e)
	}
	return out
}

// cachedPod is a pod as the pods' informer keeps it: what the builder
// reads (file.Pod, a fifth of a corev1.Pod's size), its resource version
// (onUpdate) and its Meshed condition (the write-back compares it).
type cachedPod struct {
	file.Pod
	resourceVersion string
	meshed          *corev1.PodCondition
}

// GetObjectMeta makes a cachedPod an object the informer's cache can key
// (by namespace and name) and the reflector can read the version of.
func (p *cachedPod) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: types.UID(p.UID), ResourceVersion: p.resourceVersion}
}

// stripPod keeps of a pod only what mantlet reads (the informer keeps
// this instead of the whole object).
func stripPod(p *corev1.Pod) *cachedPod {
	out := &cachedPod{Pod: *file.PodOf(p), resourceVersion: p.ResourceVersion}
	for _, c := range p.Status.Conditions {
		if c.Type == ConditionMeshed {
			out.meshed = &c
		}
	}
	return out
}

// meshAnnotations keeps the mantlet.io annotations.
func meshAnnotations(in map[string]string) map[string]string { return file.MeshAnnotations(in) }

// sameStripped reports whether two versions of a stripped Namespace,
// Node, Service or EndpointSlice say the same to mantlet: equal but for
// their resource version.
func sameStripped(a, b any) bool {
	switch x := a.(type) {
	case *corev1.Namespace:
		y, ok := b.(*corev1.Namespace)
		return ok && equalButVersion(*x, *y, func(o *corev1.Namespace) *metav1.ObjectMeta { return &o.ObjectMeta })
	case *corev1.Node:
		y, ok := b.(*corev1.Node)
		return ok && equalButVersion(*x, *y, func(o *corev1.Node) *metav1.ObjectMeta { return &o.ObjectMeta })
	case *corev1.Service:
		y, ok := b.(*corev1.Service)
		return ok && equalButVersion(*x, *y, func(o *corev1.Service) *metav1.ObjectMeta { return &o.ObjectMeta })
	case *discoveryv1.EndpointSlice:
		y, ok := b.(*discoveryv1.EndpointSlice)
		return ok && equalButVersion(*x, *y, func(o *discoveryv1.EndpointSlice) *metav1.ObjectMeta { return &o.ObjectMeta })
	}
	return false
}

// equalButVersion compares shallow copies of two objects with their
// resource versions and generations cleared.
func equalButVersion[T any](x, y T, meta func(*T) *metav1.ObjectMeta) bool {
	for _, m := range []*metav1.ObjectMeta{meta(&x), meta(&y)} {
		m.ResourceVersion, m.Generation = "", 0
	}
	return equality.Semantic.DeepEqual(x, y)
}
