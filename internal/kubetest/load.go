package kubetest

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// Load creates in the API server the objects of a cluster file such as a
// testbed's (Namespaces, Nodes, Pods with their status, Services), the way
// the missing controllers and kubelets would have: each pod's
// ServiceAccount, each pod's and node's status through the status
// subresource, and for each Service with a selector an EndpointSlice of
// the pods it selects, all ready. A Service keeps its clusterIP unless the
// address is taken (the API server's own kubernetes Service holds the
// range's first address); then the API server picks one. Load returns the
// Services as created.
func (s *Server) Load(ctx context.Context, manifest []byte) ([]*corev1.Service, error) {
	c := s.client
	var (
		pods     []*corev1.Pod
		services []*corev1.Service
	)
	for i, doc := range bytes.Split(manifest, []byte("\n---\n")) {
		if js, err := yaml.YAMLToJSON(doc); err == nil && (len(bytes.TrimSpace(js)) == 0 || string(bytes.TrimSpace(js)) == "null") {
			continue // blank, or only comments
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("kubetest: load: document %d: %w", i+1, err)
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			if _, err := c.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				return nil, fmt.Errorf("kubetest: load namespace %s: %w", o.Name, err)
			}
		case *corev1.Node:
			st := o.Status
			n, err := c.CoreV1().Nodes().Create(ctx, o, metav1.CreateOptions{})
			if err != nil {
				return nil, fmt.Errorf("kubetest: load node %s: %w", o.Name, err)
			}
			n.Status = st
			if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
				return nil, fmt.Errorf("kubetest: load node %s status: %w", o.Name, err)
			}
		case *corev1.Pod:
			pods = append(pods, o)
		case *corev1.Service:
			services = append(services, o)
		default:
			return nil, fmt.Errorf("kubetest: load: document %d: %T is not loaded", i+1, obj)
		}
	}
	var created []*corev1.Pod
	for _, o := range pods {
		p, err := s.createPod(ctx, o)
		if err != nil {
			return nil, err
		}
		created = append(created, p)
	}
	var out []*corev1.Service
	for _, o := range services {
		svc, err := s.createService(ctx, c, o, created)
		if err != nil {
			return nil, err
		}
		out = append(out, svc)
	}
	return out, nil
}

// createPod creates a pod and its ServiceAccount, then writes its status.
func (s *Server) createPod(ctx context.Context, o *corev1.Pod) (*corev1.Pod, error) {
	c := s.client
	sa := o.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
		o.Spec.ServiceAccountName = sa
	}
	acct := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: sa}}
	if _, err := c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, acct, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("kubetest: load service account %s/%s: %w", o.Namespace, sa, err)
	}
	if len(o.Spec.Containers) == 0 {
		o.Spec.Containers = []corev1.Container{{Name: "app", Image: "mantlet.test/app"}}
	}
	st := o.Status
	o.UID = "" // the API server gives one
	p, err := c.CoreV1().Pods(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("kubetest: load pod %s/%s: %w", o.Namespace, o.Name, err)
	}
	p.Status = st
	if p.Status.Phase == "" {
		p.Status.Phase = corev1.PodRunning
	}
	if p, err = c.CoreV1().Pods(o.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("kubetest: load pod %s/%s status: %w", o.Namespace, o.Name, err)
	}
	return p, nil
}

// createService creates a Service and the EndpointSlice of the pods its
// selector matches.
func (s *Server) createService(ctx context.Context, c kubernetes.Interface, o *corev1.Service, pods []*corev1.Pod) (*corev1.Service, error) {
	if ip := o.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
		taken, err := s.clusterIPTaken(ctx, ip)
		if err != nil {
			return nil, err
		}
		if taken {
			o.Spec.ClusterIP, o.Spec.ClusterIPs = "", nil
		}
	}
	svc, err := c.CoreV1().Services(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("kubetest: load service %s/%s: %w", o.Namespace, o.Name, err)
	}
	if len(svc.Spec.Selector) == 0 {
		return svc, nil
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: svc.Namespace, Name: svc.Name + "-kubetest", Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, sp := range svc.Spec.Ports {
		port := sp.TargetPort.IntVal
		if port == 0 {
			port = sp.Port
		}
		slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: ptr.To(sp.Name), Port: ptr.To(port), Protocol: ptr.To(corev1.ProtocolTCP)})
	}
	for _, p := range pods {
		if p.Namespace != svc.Namespace || !sel.Matches(labels.Set(p.Labels)) || p.Status.PodIP == "" {
			continue
		}
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(p.Spec.NodeName),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: p.UID},
		})
	}
	if _, err := c.DiscoveryV1().EndpointSlices(svc.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("kubetest: load endpoint slice of %s/%s: %w", svc.Namespace, svc.Name, err)
	}
	return svc, nil
}

// clusterIPTaken reports whether a Service already holds ip.
func (s *Server) clusterIPTaken(ctx context.Context, ip string) (bool, error) {
	want, err := netip.ParseAddr(ip)
	if err != nil {
		return false, fmt.Errorf("kubetest: clusterIP %q: %w", ip, err)
	}
	list, err := s.client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return false, fmt.Errorf("kubetest: list services: %w", err)
	}
	for _, svc := range list.Items {
		if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil && a == want {
			return true, nil
		}
	}
	return false, nil
}
