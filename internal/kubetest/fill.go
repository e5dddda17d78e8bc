package kubetest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// meshPolicies is the MeshPolicy CRD's resource; the CRD must be
// installed before Fill.
var meshPolicies = schema.GroupVersionResource{Group: v1alpha1.GroupName, Version: "v1alpha1", Resource: "meshpolicies"}

// Fill describes a synthetic cluster that exists only in the API server,
// as the scale benchmarks load it: Namespaces namespaces called
// <Prefix><i>, each annotated mantlet.io/mesh: enabled and holding
// PodsPerNamespace running pods (labelled app: svc-<j mod
// ServicesPerNamespace>, spread round-robin over Nodes), ServicesPerNamespace
// Services with an EndpointSlice of their ready pods (with the pods'
// UIDs, as the EndpointSlice controller writes them), and
// PoliciesPerNamespace MeshPolicies, each allowing its namespace to port
// 80 of one service's pods.
type Fill struct {
	Prefix                                                       string
	Namespaces, PodsPerNamespace, ServicesPerNamespace, Policies int
	// Nodes are created (with an InternalIP in 10.0.0.0/24) unless they
	// exist; the pods run on them.
	Nodes []string
	// PolicyStatus, when set, is written as each MeshPolicy's status
	// (through the status subresource) with the policy's generation, as
	// the agents of a running cluster would have written it.
	PolicyStatus func(generation int64) map[string]any
}

// Total returns the number of pods, services and MeshPolicies f creates.
func (f Fill) Total() (pods, services, policies int) {
	return f.Namespaces * f.PodsPerNamespace, f.Namespaces * f.ServicesPerNamespace, f.Namespaces * f.Policies
}

// PodIP returns the address of pod j of namespace i: 10.<1+i/200>.<i%200>.<10+j>.
func (f Fill) PodIP(i, j int) string {
	return fmt.Sprintf("10.%d.%d.%d", 1+i/200, i%200, 10+j)
}

// Fill creates f in the server with sixteen requests at a time (pods with
// their status, then each namespace's Services and EndpointSlices), and
// MeshPolicies through dyn. It stops at the first error.
func (s *Server) Fill(ctx context.Context, dyn dynamic.Interface, f Fill) error {
	c := s.client
	switch {
	case f.PodsPerNamespace > 245:
		return errors.New("kubetest: fill: at most 245 pods per namespace")
	case f.ServicesPerNamespace <= 0 || f.Namespaces <= 0 || len(f.Nodes) == 0:
		return errors.New("kubetest: fill: Namespaces, ServicesPerNamespace and Nodes are required")
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	work := make(chan func() error)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for fn := range work {
				if err := fn(); err != nil {
					cancel(err)
				}
			}
		})
	}
	send := func(fn func() error) bool {
		select {
		case work <- fn:
			return true
		case <-ctx.Done():
			return false
		}
	}
	finish := sync.OnceFunc(func() { close(work); wg.Wait() })
	defer finish()

	for n, name := range f.Nodes {
		if _, err := c.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{}); err == nil {
			continue
		}
		got, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("kubetest: fill: create node %s: %w", name, err)
		}
		got.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.0.0." + strconv.Itoa(n+1)}}
		if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("kubetest: fill: node %s status: %w", name, err)
		}
	}
	for i := range f.Namespaces {
		ns := f.Prefix + strconv.Itoa(i)
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
			Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("kubetest: fill: create namespace %s: %w", ns, err)
		}
		if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("kubetest: fill: create service account %s/app: %w", ns, err)
		}
		uids := make([]types.UID, f.PodsPerNamespace)
		var podsWG sync.WaitGroup
		for j := range f.PodsPerNamespace {
			ip := f.PodIP(i, j)
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pod-" + strconv.Itoa(j),
				Labels: map[string]string{"app": "svc-" + strconv.Itoa(j%f.ServicesPerNamespace)}},
				Spec: corev1.PodSpec{NodeName: f.Nodes[(i*f.PodsPerNamespace+j)%len(f.Nodes)], ServiceAccountName: "app",
					Containers: []corev1.Container{{Name: "app", Image: "mantlet.test/app"}}}}
			podsWG.Add(1)
			if !send(func() error {
				defer podsWG.Done()
				got, err := c.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
				if err != nil {
					return fmt.Errorf("kubetest: fill: create pod %s/%s: %w", ns, pod.Name, err)
				}
				uids[j] = got.UID
				got.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
				if _, err = c.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
					return fmt.Errorf("kubetest: fill: pod %s/%s status: %w", ns, pod.Name, err)
				}
				return nil
			}) {
				podsWG.Done()
				break
			}
		}
		podsWG.Wait()
		if err := context.Cause(ctx); err != nil {
			return err
		}
		for k := range f.ServicesPerNamespace {
			name := "svc-" + strconv.Itoa(k)
			send(func() error {
				svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
					Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Port: 80}}}}, metav1.CreateOptions{})
				if err != nil {
					return fmt.Errorf("kubetest: fill: create service %s/%s: %w", ns, name, err)
				}
				slice := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name}},
					AddressType: discoveryv1.AddressTypeIPv4, Ports: []discoveryv1.EndpointPort{{Port: ptr.To[int32](80)}}}
				for j := k; j < f.PodsPerNamespace; j += f.ServicesPerNamespace {
					slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{f.PodIP(i, j)},
						Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
						NodeName:   ptr.To(f.Nodes[(i*f.PodsPerNamespace+j)%len(f.Nodes)]),
						TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "pod-" + strconv.Itoa(j), UID: uids[j]}})
				}
				if _, err := c.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
					return fmt.Errorf("kubetest: fill: create endpoint slice %s/%s: %w", ns, name, err)
				}
				return nil
			})
		}
		for k := range f.Policies {
			pol := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
				"metadata": map[string]any{"namespace": ns, "name": "pol-" + strconv.Itoa(k)},
				"spec": map[string]any{"action": string(v1alpha1.ActionAllow),
					"selector": map[string]any{"matchLabels": map[string]any{"app": "svc-" + strconv.Itoa(k%f.ServicesPerNamespace)}},
					"rules":    []any{map[string]any{"from": []any{map[string]any{"namespaces": []any{ns}}}, "to": map[string]any{"ports": []any{"80"}}}}}}}
			send(func() error {
				got, err := dyn.Resource(meshPolicies).Namespace(ns).Create(ctx, pol, metav1.CreateOptions{})
				if err != nil {
					return fmt.Errorf("kubetest: fill: create MeshPolicy %s/%s: %w", ns, pol.GetName(), err)
				}
				if f.PolicyStatus == nil {
					return nil
				}
				got.Object["status"] = f.PolicyStatus(got.GetGeneration())
				if _, err := dyn.Resource(meshPolicies).Namespace(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
					return fmt.Errorf("kubetest: fill: MeshPolicy %s/%s status: %w", ns, pol.GetName(), err)
				}
				return nil
			})
		}
	}
	finish()
	return context.Cause(ctx)
}
