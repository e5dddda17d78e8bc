package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/mantlet/mantlet/internal/testbed"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// DemoNamespace is the namespace Demo meshes.
const DemoNamespace = "demo"

// Demo runs the demo's checks on a cluster where mantlet is installed, and
// tells w what it sees: a namespace annotated mantlet.io/mesh=enabled
// with an echo server on the last node, its Service, and a client on the
// first node; the pods are marked Meshed; the client reaches the echo by
// pod IP and by ClusterIP, and the echo sees the client's pod IP; on the
// underlay only TLS to port 15008 crosses, never the message; a DENY
// MeshPolicy refuses the connection, and removing it lets it through. The
// pods stay, for the user to look at. It returns an error for the first
// check that fails.
func (c *Cluster) Demo(ctx context.Context, w io.Writer) error {
	admin := c.Admin()
	first, last := c.Nodes[0], c.Nodes[len(c.Nodes)-1]
	ok := func(format string, args ...any) { fmt.Fprintf(w, "  ok  "+format+"\n", args...) }

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: DemoNamespace, Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	for _, p := range []*corev1.Pod{echoPod(DemoNamespace, "echo", last.Name), idlePod(DemoNamespace, "client", first.Name)} {
		if _, err := admin.CoreV1().Pods(DemoNamespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	svc, err := admin.CoreV1().Services(DemoNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: DemoNamespace, Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(echoPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	echo, err := c.waitPod(ctx, DemoNamespace, "echo", func(p *corev1.Pod) bool { return podReady(p) && meshedCondition(p) })
	if err != nil {
		return err
	}
	client, err := c.waitPod(ctx, DemoNamespace, "client", func(p *corev1.Pod) bool { return p.Status.PodIP != "" && meshedCondition(p) })
	if err != nil {
		return err
	}
	ok("namespace %s meshed: echo %s on %s, client %s on %s, both Meshed", DemoNamespace, echo.Status.PodIP, last.Name, client.Status.PodIP, first.Name)

	var b [6]byte
	_, _ = rand.Read(b[:])
	marker := "MANTLET-DEMO-" + hex.EncodeToString(b[:])
	podAddr := net.JoinHostPort(echo.Status.PodIP, strconv.Itoa(echoPort))
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	echoIP := netip.MustParseAddr(echo.Status.PodIP)
	conns := HBONEConns{} // the second target's flow may ride the first's connection
	for _, target := range []struct{ what, addr string }{{"pod IP", podAddr}, {"ClusterIP Service", vip}} {
		wctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
		err := c.WaitAgentMeshes(wctx, first, client.Status.PodIP, target.addr, echoIP)
		cancel()
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cp, err := c.Testbed.Capture(cctx)
		if err != nil {
			cancel()
			return fmt.Errorf("demo: capture: %w", err)
		}
		var greeting string
		err = retry(ctx, 30*time.Second, func() error {
			var err error
			greeting, err = talk(ctx, c, client, target.addr, marker)
			return err
		})
		time.Sleep(100 * time.Millisecond)
		pkts, cerr := cp.Stop()
		cancel()
		if err != nil {
			return fmt.Errorf("demo: client to echo by %s (%s): %w", target.what, target.addr, err)
		}
		if cerr != nil {
			return fmt.Errorf("demo: capture: %w", cerr)
		}
		if !strings.Contains(greeting, " to "+client.Status.PodIP+":") {
			return fmt.Errorf("demo: the echo saw %q, not the client's pod IP %s", greeting, client.Status.PodIP)
		}
		if testbed.Contains(pkts, []byte(marker)) {
			return fmt.Errorf("demo: the message crossed the underlay in clear (by %s)", target.what)
		}
		hbone, err := conns.Check(pkts, netip.MustParseAddr(client.Status.PodIP), echoIP)
		if err != nil {
			return fmt.Errorf("demo: on the underlay, by %s: %w", target.what, err)
		}
		if hbone == 0 {
			return fmt.Errorf("demo: no HBONE connection to %s:15008 carried the flow on the underlay (by %s)", echo.Status.PodIP, target.what)
		}
		ok("client to echo by %s %s: %q; on the wire only TLS 1.3 to %s:15008, the message never in clear", target.what, target.addr, greeting, echo.Status.PodIP)
	}

	dyn, err := dynamic.NewForConfig(c.API.AdminConfig())
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	mp := dyn.Resource(mkube.MeshPolicies).Namespace(DemoNamespace)
	deny := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
		"metadata": map[string]any{"namespace": DemoNamespace, "name": "deny-echo"},
		"spec":     map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "echo"}}, "action": "DENY", "rules": []any{map[string]any{}}}}}
	if _, err := mp.Create(ctx, deny, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := retry(ctx, 30*time.Second, func() error {
		if _, err := talk(ctx, c, client, podAddr, "denied?"); err == nil {
			return fmt.Errorf("still allowed")
		}
		return nil
	}); err != nil {
		return fmt.Errorf("demo: the DENY MeshPolicy did not refuse the client: %w", err)
	}
	ok("MeshPolicy deny-echo (DENY) refuses the client")
	if err := mp.Delete(ctx, "deny-echo", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := retry(ctx, 30*time.Second, func() error { _, err := talk(ctx, c, client, podAddr, "allowed"); return err }); err != nil {
		return fmt.Errorf("demo: with the policy removed the client is still refused: %w", err)
	}
	ok("policy removed: the client gets through again")
	return nil
}

// waitPod waits until cond holds for the pod (ReadyTimeout at most).
func (c *Cluster) waitPod(ctx context.Context, ns, name string, cond func(*corev1.Pod) bool) (*corev1.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
	defer cancel()
	var pod *corev1.Pod
	err := c.poll(ctx, "pod "+ns+"/"+name, func() (bool, string) {
		p, err := c.Admin().CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		pod = p
		return cond(p), podSummary(p)
	})
	return pod, err
}

// retry calls f every 200 ms until it succeeds or d passes; it returns
// f's last error.
func retry(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
