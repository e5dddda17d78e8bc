package kubecluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// The workloads of the tests and the demo: echo servers, clients, idle
// pods to connect from, all from the test images.

// echoPort is the echo server's port in the pods.
const echoPort = 8080

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

// meshedCondition reports whether the agent marked the pod Meshed.
func meshedCondition(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == mkube.ConditionMeshed {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
