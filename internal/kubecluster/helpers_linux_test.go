package kubecluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// EchoPort is the echo server's port in the test pods.
const echoPort = 8080

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

// echoPod is an echo server on node, labelled app=<name>.
func echoPod(namespace, name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			// Through the scheduler, to the node asked for.
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": node},
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers: []corev1.Container{{
				Name: "echo", Image: EchoImage, ImagePullPolicy: corev1.PullNever,
				Ports: []corev1.ContainerPort{{Name: "echo", ContainerPort: echoPort}},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(echoPort)}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
}

// clientPod runs the client once against address; it succeeds if the
// echo answers.
func clientPod(namespace, name, node, address, send string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{
			NodeSelector:  map[string]string{"kubernetes.io/hostname": node},
			RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{
				Name: "client", Image: ClientImage, ImagePullPolicy: corev1.PullNever,
				Args: []string{"-connect", address, "-send", send},
			}},
		},
	}
}

// idlePod is a pod whose container only waits: a place to open
// connections from (DialFromPod).
func idlePod(namespace, name, node string) *corev1.Pod {
	p := echoPod(namespace, name, node)
	p.Spec.Containers[0].ReadinessProbe = nil
	p.Spec.Containers[0].Image = PauseImage
	p.Spec.Containers[0].Ports = nil
	return p
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

func podReady(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func podSummary(p *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "phase %s, ip %q, node %q", p.Status.Phase, p.Status.PodIP, p.Spec.NodeName)
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			fmt.Fprintf(&b, "; %s=%s %s %s", c.Type, c.Status, c.Reason, c.Message)
		}
	}
	for _, s := range p.Status.ContainerStatuses {
		if w := s.State.Waiting; w != nil {
			fmt.Fprintf(&b, "; %s waiting: %s %s", s.Name, w.Reason, w.Message)
		}
		if x := s.State.Terminated; x != nil {
			fmt.Fprintf(&b, "; %s terminated: %d %s %s", s.Name, x.ExitCode, x.Reason, x.Message)
		}
	}
	return b.String()
}

// exchange reads the echo's greeting on conn, sends line and expects it
// back; it returns the greeting.
func exchange(conn net.Conn, line string) (string, error) {
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	greeting, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read the greeting: %w", err)
	}
	if _, err := io.WriteString(conn, line+"\n"); err != nil {
		return greeting, fmt.Errorf("send: %w", err)
	}
	back, err := r.ReadString('\n')
	if err != nil {
		return greeting, fmt.Errorf("read the echo: %w", err)
	}
	if back != line+"\n" {
		return greeting, fmt.Errorf("sent %q, got %q back", line, back)
	}
	return strings.TrimSpace(greeting), nil
}

// talk dials address from pod and exchanges one line.
func talk(ctx context.Context, c *Cluster, from *corev1.Pod, address, line string) (string, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := c.DialFromPod(dctx, from, address)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	return exchange(conn, line)
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
