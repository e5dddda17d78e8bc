package file

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Pod is what the builder reads of a pod. A file's pods are reduced to it
// as they are decoded; the Kubernetes source's informer keeps pods in
// this form only, since a corev1.Pod is 1,240 bytes however little of it
// is filled and a cluster has thousands. Field names follow the Pod's, and
// messages name the Pod's fields.
type Pod struct {
	Name, Namespace, UID string
	Labels               map[string]string
	// Annotations are the mantlet.io ones only.
	Annotations map[string]string
	// NodeName, ServiceAccountName, DeprecatedServiceAccount and
	// HostNetwork are the spec's.
	NodeName                                     string
	ServiceAccountName, DeprecatedServiceAccount string
	HostNetwork                                  bool
	// Phase, PodIP, PodIPs and HostIP are the status's.
	Phase         corev1.PodPhase
	PodIP, HostIP string
	PodIPs        []string
	// Ports are the containers' ports, those of the first container
	// first (named target ports of services resolve through them).
	Ports []corev1.ContainerPort
}

// PodOf reduces a Pod to what the builder reads.
func PodOf(p *corev1.Pod) *Pod {
	out := &Pod{
		Name: p.Name, Namespace: p.Namespace, UID: string(p.UID), Labels: p.Labels, Annotations: MeshAnnotations(p.Annotations),
		NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName,
		DeprecatedServiceAccount: p.Spec.DeprecatedServiceAccount, HostNetwork: p.Spec.HostNetwork,
		Phase: p.Status.Phase, PodIP: p.Status.PodIP, HostIP: p.Status.HostIP,
	}
	if len(p.Status.PodIPs) > 0 {
		out.PodIPs = make([]string, len(p.Status.PodIPs))
		for i, a := range p.Status.PodIPs {
			out.PodIPs[i] = a.IP
		}
	}
	n := 0
	for _, c := range p.Spec.Containers {
		n += len(c.Ports)
	}
	if n > 0 {
		out.Ports = make([]corev1.ContainerPort, 0, n)
		for _, c := range p.Spec.Containers {
			out.Ports = append(out.Ports, c.Ports...)
		}
	}
	return out
}

// MeshAnnotations returns the mantlet.io annotations of in (nil if none).
func MeshAnnotations(in map[string]string) map[string]string {
	var out map[string]string
	for k, v := range in {
		if strings.HasPrefix(k, "mantlet.io/") {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}
