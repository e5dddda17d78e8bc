package kubernetes

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
)

// TestStripKeepsWhatMantletReads: every informer's cache drops managed
// fields and foreign annotations, and keeps what the builder and the
// write-back read.
func TestStripKeepsWhatMantletReads(t *testing.T) {
	meta := func() metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: "x", Namespace: "shop", UID: "u1", ResourceVersion: "7", Generation: 2,
			Labels:        map[string]string{"kubernetes.io/service-name": "web", "team": "a"},
			Annotations:   map[string]string{"mantlet.io/mesh": "enabled", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}}
	}
	kept := func(t *testing.T, m metav1.ObjectMeta) {
		t.Helper()
		if m.Name != "x" || m.UID != "u1" || m.ResourceVersion != "7" || m.Generation != 2 || len(m.ManagedFields) != 0 ||
			len(m.Annotations) != 1 || m.Annotations["mantlet.io/mesh"] != "enabled" {
			t.Errorf("metadata %+v", m)
		}
	}
	t.Run("namespace", func(t *testing.T) {
		out, _ := strip(&corev1.Namespace{ObjectMeta: meta()})
		kept(t, out.(*corev1.Namespace).ObjectMeta)
	})
	t.Run("node", func(t *testing.T) {
		out, _ := strip(&corev1.Node{ObjectMeta: meta(), Status: corev1.NodeStatus{
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.18.0.1"}},
			Images:    []corev1.ContainerImage{{Names: []string{"registry.example/big:1"}, SizeBytes: 1 << 30}}}})
		n := out.(*corev1.Node)
		kept(t, n.ObjectMeta)
		if len(n.Status.Images) != 0 || len(n.Status.Addresses) != 1 || n.Status.Addresses[0].Address != "198.18.0.1" {
			t.Errorf("node status %+v", n.Status)
		}
	})
	t.Run("service", func(t *testing.T) {
		out, _ := strip(&corev1.Service{ObjectMeta: meta(), Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP,
			ClusterIP: "198.18.128.1", ClusterIPs: []string{"198.18.128.1"}, Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80}}, SessionAffinity: corev1.ServiceAffinityClientIP}})
		s := out.(*corev1.Service)
		kept(t, s.ObjectMeta)
		if s.Spec.ClusterIP != "198.18.128.1" || len(s.Spec.ClusterIPs) != 1 || s.Spec.Selector["app"] != "web" ||
			len(s.Spec.Ports) != 1 || s.Spec.Type != corev1.ServiceTypeClusterIP || s.Spec.SessionAffinity != "" {
			t.Errorf("service spec %+v", s.Spec)
		}
	})
	t.Run("endpoint slice", func(t *testing.T) {
		out, _ := strip(&discoveryv1.EndpointSlice{ObjectMeta: meta(), AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"198.19.1.10"}, NodeName: ptr.To("node1"),
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)},
				TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "a", UID: "p1"}}}})
		s := out.(*discoveryv1.EndpointSlice)
		kept(t, s.ObjectMeta)
		if len(s.Labels) != 1 || s.Labels[discoveryv1.LabelServiceName] != "web" {
			t.Errorf("labels %v", s.Labels)
		}
		if len(s.Endpoints) != 1 || s.Endpoints[0].Conditions.Ready == nil || *s.Endpoints[0].Conditions.Ready ||
			s.Endpoints[0].TargetRef.Kind != "Pod" || s.Endpoints[0].TargetRef.UID != "p1" || len(s.Endpoints[0].Addresses) != 0 {
			t.Errorf("endpoints %+v", s.Endpoints)
		}
		if got := readyEndpoints([]*discoveryv1.EndpointSlice{s}); len(got["shop/web"]) != 0 {
			t.Errorf("an unready endpoint is ready after stripping: %v", got)
		}
	})
	t.Run("MeshPolicy", func(t *testing.T) {
		u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
			"metadata": map[string]any{"name": "x", "namespace": "shop", "generation": int64(2),
				"annotations":   map[string]any{"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
				"managedFields": []any{map[string]any{"manager": "kubectl"}}},
			"spec":   map[string]any{"action": "DENY"},
			"status": map[string]any{"conditions": []any{map[string]any{"type": "Accepted"}}}}}
		out, _ := strip(u)
		p := out.(*unstructured.Unstructured)
		if len(p.GetManagedFields()) != 0 || len(p.GetAnnotations()) != 0 || p.GetGeneration() != 2 {
			t.Errorf("metadata %v", p.Object["metadata"])
		}
		if _, ok := p.Object["spec"]; !ok || len(policyConditions(p)) != 1 {
			t.Errorf("spec or status lost: %v", p.Object)
		}
	})
}
