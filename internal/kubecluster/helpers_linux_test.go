package kubecluster

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// createNamespace creates a namespace with annotations and removes it when
// the test ends (the namespace controller deletes its pods).
func createNamespace(ctx context.Context, t *testing.T, c *Cluster, name string, annotations map[string]string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations}}
	if _, err := c.Admin().CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		deleteNamespace(ctx, t, c, name)
	})
}

// deleteNamespace deletes a namespace and waits until it is gone, so that
// its pods are gone from the nodes too.
func deleteNamespace(ctx context.Context, t *testing.T, c *Cluster, name string) {
	t.Helper()
	err := c.Admin().CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	if apierrors.IsNotFound(err) {
		return
	}
	if err != nil {
		t.Errorf("delete namespace %s: %v", name, err)
		return
	}
	for ctx.Err() == nil {
		if _, err := c.Admin().CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Errorf("namespace %s still there: %v", name, ctx.Err())
}

// createPod creates a pod.
func createPod(ctx context.Context, t *testing.T, c *Cluster, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	p, err := c.Admin().CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// waitPod waits until ok says the pod is as wanted, and returns it.
func waitPod(ctx context.Context, t *testing.T, c *Cluster, namespace, name, what string, ok func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	var last string
	for {
		p, err := c.Admin().CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err == nil && ok(p) {
			return p
		}
		if err != nil {
			last = err.Error()
		} else {
			last = podSummary(p)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s/%s not %s: %v; last: %s", namespace, name, what, ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func waitRunning(ctx context.Context, t *testing.T, c *Cluster, namespace, name string) *corev1.Pod {
	t.Helper()
	return waitPod(ctx, t, c, namespace, name, "Ready", podReady)
}

// waitServiceProgrammed waits until kube-proxy on node has rules that
// send the service's virtual IP to an endpoint (not the REJECT of a
// service without endpoints).
func waitServiceProgrammed(ctx context.Context, t *testing.T, c *Cluster, node *Node, vip string) {
	t.Helper()
	var last string
	for ctx.Err() == nil {
		out, err := node.Testbed.Command(ctx, "iptables-save", "-t", "nat").CombinedOutput()
		last = string(out)
		for line := range strings.Lines(last) {
			if err == nil && strings.Contains(line, "-d "+vip+"/32") && strings.Contains(line, "-j KUBE-SVC-") {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("kube-proxy on %s never programmed %s: %v; nat table:\n%s", node.Name, vip, ctx.Err(), last)
}
