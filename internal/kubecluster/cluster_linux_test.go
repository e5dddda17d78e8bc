package kubecluster

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestPodsRunOnBothNodesAndReachEachOther: the scheduler places pods on
// both nodes, the kubelets run them through containerd and runc, CNI ptp
// gives them addresses of their node's pod CIDR, and a pod on one node
// reaches a pod on the other by its address, seen from its own. A client
// container (a real one, not the test dialling from the pod's namespace)
// does the same, and through a ClusterIP Service by kube-proxy.
func TestPodsRunOnBothNodesAndReachEachOther(t *testing.T) {
	c := cluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	const ns = "plain"
	createNamespace(ctx, t, c, ns, nil)
	createPod(ctx, t, c, echoPod(ns, "echo", n2.Name))
	createPod(ctx, t, c, idlePod(ns, "client", n1.Name))
	echo := waitRunning(ctx, t, c, ns, "echo")
	client := waitPod(ctx, t, c, ns, "client", "Running", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" })
	for _, p := range []struct {
		pod  *corev1.Pod
		node *Node
	}{{echo, n2}, {client, n1}} {
		ip, err := netip.ParseAddr(p.pod.Status.PodIP)
		if err != nil || !p.node.Testbed.PodCIDR.Contains(ip) || p.pod.Spec.NodeName != p.node.Name {
			t.Errorf("pod %s: node %s, IP %s; want node %s and an IP in %s", p.pod.Name, p.pod.Spec.NodeName, p.pod.Status.PodIP, p.node.Name, p.node.Testbed.PodCIDR)
		}
	}

	addr := net.JoinHostPort(echo.Status.PodIP, strconv.Itoa(echoPort))
	greeting, err := talk(ctx, c, client, addr, "across nodes")
	if err != nil {
		t.Fatalf("client pod on %s to echo pod on %s (%s): %v", n1.Name, n2.Name, addr, err)
	}
	if want := "hello from echo to " + client.Status.PodIP + ":"; !strings.HasPrefix(greeting, want) {
		t.Errorf("greeting %q, want it to start with %q (the echo sees the client's pod IP)", greeting, want)
	}

	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(echoPort)}},
		},
	}
	svc, err = c.Admin().CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	waitServiceProgrammed(ctx, t, c, n1, svc.Spec.ClusterIP)
	createPod(ctx, t, c, clientPod(ns, "client-pod-ip", n1.Name, addr, "from a container"))
	createPod(ctx, t, c, clientPod(ns, "client-service", n1.Name, vip, "through kube-proxy"))
	for _, name := range []string{"client-pod-ip", "client-service"} {
		p := waitPod(ctx, t, c, ns, name, "finished", func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
		})
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("client container %s: %s", name, podSummary(p))
		}
	}
}
