package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/mantlet/mantlet/internal/testbed"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// The agent's capabilities, as the chart declares them (values privileged
// and hostPID off).
var chartCapabilities = []string{"NET_ADMIN", "BPF", "SYS_ADMIN"}

// TestAgentWithoutNetAdminFailsClearly: a DaemonSet whose agent lacks
// NET_ADMIN (someone trimmed the chart's list) does not run half-working:
// the agent exits, and its log says which capability it lacks. Putting the
// capability back brings the agents back.
func TestAgentWithoutNetAdminFailsClearly(t *testing.T) {
	c := meshed(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	ds := c.Admin().AppsV1().DaemonSets(MeshNamespace)
	patchCaps := func(caps []string) {
		t.Helper()
		b := fmt.Sprintf(`[{"op":"replace","path":"/spec/template/spec/containers/0/securityContext/capabilities/add","value":["%s"]}]`, strings.Join(caps, `","`))
		if _, err := ds.Patch(ctx, AgentDaemonSet, types.JSONPatchType, []byte(b), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	patchCaps([]string{"BPF", "SYS_ADMIN"})
	restored := false
	t.Cleanup(func() {
		if !restored {
			patchCaps(chartCapabilities)
			_ = c.WaitAgentsReady(context.Background())
		}
	})
	// The first node's agent is replaced (maxUnavailable 1), and fails.
	var logs string
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		logs = failedAgentLogs(t, c)
		if logs != "" {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if logs == "" {
		t.Fatal("no agent without NET_ADMIN failed within 2 minutes")
	}
	t.Logf("the agent without NET_ADMIN said:\n%s", logs)
	if !strings.Contains(logs, "CAP_NET_ADMIN") {
		t.Errorf("the failed agent's log does not name the missing capability CAP_NET_ADMIN:\n%s", logs)
	}
	patchCaps(chartCapabilities)
	restored = true
	if err := c.WaitAgentsReady(ctx); err != nil {
		t.Fatal(err)
	}
}

// failedAgentLogs returns the log of an agent container that exited with
// an error, read from its node's pod log folder, or "".
func failedAgentLogs(t *testing.T, c *Cluster) string {
	t.Helper()
	pods, err := c.Admin().CoreV1().Pods(MeshNamespace).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return ""
	}
	for _, p := range pods.Items {
		for _, s := range p.Status.ContainerStatuses {
			term := s.LastTerminationState.Terminated
			if term == nil {
				term = s.State.Terminated
			}
			if term == nil || term.ExitCode == 0 {
				continue
			}
			if logs := agentPodLog(c.Node(p.Spec.NodeName), &p); logs != "" {
				return logs
			}
		}
	}
	return ""
}

// agentLogLines returns the lines of node's agent's log (every container
// the agent pod ran, from the node's pod log folder) that contain sub.
func agentLogLines(c *Cluster, node *Node, sub string) string {
	pods, err := c.Admin().CoreV1().Pods(MeshNamespace).List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName=" + node.Name})
	if err != nil {
		return fmt.Sprintf("(listing the agent pods: %v)", err)
	}
	var b strings.Builder
	for _, p := range pods.Items {
		b.WriteString(grepLines(agentPodLog(node, &p), sub))
	}
	return b.String()
}

// agentPodLog returns what the agent containers of pod p wrote, read from
// its node's pod log folder (every container the pod ran), or "".
func agentPodLog(n *Node, p *corev1.Pod) string {
	files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", p.Namespace+"_"+p.Name+"_"+string(p.UID), "agent", "*.log"))
	var b strings.Builder
	for _, f := range files {
		data, _ := os.ReadFile(f)
		b.Write(data)
	}
	return b.String()
}

// logFlowsOnFailure logs, if the test failed, what node's agent logged
// about ip: its access log says which path each flow took.
func logFlowsOnFailure(t *testing.T, c *Cluster, node *Node, ip string) {
	t.Helper()
	if t.Failed() {
		t.Logf("the agent on %s about %s:\n%s", node.Name, ip, agentLogLines(c, node, ip))
	}
}

func newMarker(t *testing.T) string {
	t.Helper()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "KUBECLUSTER-MARKER-" + hex.EncodeToString(b[:])
}

// capture records the underlay until the returned function is called; a
// capture that lost packets fails the test (it would prove nothing).
func capture(t *testing.T, c *Cluster) func() []testbed.Packet {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := c.Testbed.Capture(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_, _ = cp.Stop()
			cancel()
		}
	})
	return func() []testbed.Packet {
		t.Helper()
		stopped = true
		time.Sleep(100 * time.Millisecond) // the last segments
		pkts, err := cp.Stop()
		cancel()
		if errors.Is(err, testbed.ErrCaptureLost) {
			t.Fatalf("the capture lost packets: %v", err)
		} else if err != nil {
			t.Fatal(err)
		}
		return pkts
	}
}

// The chart's volumes, by mount path.
var chartMounts = []string{"/sys/fs/bpf", "/run/mantlet", "/run/netns", "/var/run/netns", "/host/cni/bin", "/host/cni/net.d", "/etc/mantlet/ca"}

// Capability bits (linux/capability.h).
var capBits = map[string]uint{"NET_ADMIN": 12, "SYS_ADMIN": 21, "BPF": 39, "SYS_PTRACE": 19, "SYS_RESOURCE": 24}

// TestChartRunsTheAgentOnEveryNodeWithOnlyItsCapabilities: 'helm install'
// of the chart, as the README has it, makes the agent Ready on both real
// nodes. Each agent's container asks for the chart's capabilities and
// mounts and nothing more, and its process holds exactly those
// capabilities (effective and bounding) and sees each mount.
func TestChartRunsTheAgentOnEveryNodeWithOnlyItsCapabilities(t *testing.T) {
	c := meshed(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	agents := agentPods(ctx, t, c)
	if len(agents) != len(c.Nodes) {
		t.Fatalf("%d agent pods, want one per node (%d)", len(agents), len(c.Nodes))
	}
	var want uint64
	for _, name := range chartCapabilities {
		want |= 1 << capBits[name]
	}
	for _, p := range agents {
		ctr := p.Spec.Containers[0]
		sc := ctr.SecurityContext
		if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil {
			t.Fatalf("agent %s: securityContext %+v, want unprivileged with capabilities", p.Name, sc)
		}
		var add []string
		for _, c := range sc.Capabilities.Add {
			add = append(add, string(c))
		}
		if !slices.Equal(add, chartCapabilities) || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
			t.Errorf("agent %s: capabilities add %v drop %v, want add %v drop [ALL]", p.Name, add, sc.Capabilities.Drop, chartCapabilities)
		}
		var mounts []string
		for _, m := range ctr.VolumeMounts {
			if !strings.HasPrefix(m.MountPath, "/var/run/secrets/kubernetes.io/") {
				mounts = append(mounts, m.MountPath)
			}
		}
		if !slices.Equal(mounts, chartMounts) {
			t.Errorf("agent %s: mounts %v, want %v", p.Name, mounts, chartMounts)
		}
		pid := containerPID(t, c, p, "agent")
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, field := range []string{"CapEff", "CapBnd", "CapPrm"} {
			if got := capField(t, string(status), field); got != want {
				t.Errorf("agent %s (pid %d): %s %#x, want %#x (%v)", p.Name, pid, field, got, want, chartCapabilities)
			}
		}
		mountinfo, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range chartMounts {
			if !strings.Contains(string(mountinfo), " "+m+" ") {
				t.Errorf("agent %s: %s is not mounted in its container", p.Name, m)
			}
		}
	}
}

// agentPods lists the agent's pods.
func agentPods(ctx context.Context, t *testing.T, c *Cluster) []corev1.Pod {
	t.Helper()
	pods, err := c.Admin().CoreV1().Pods(MeshNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=mantlet-agent"})
	if err != nil {
		t.Fatal(err)
	}
	return pods.Items
}

// containerPID returns the PID of a pod's container's first process,
// from the container's cgroup on its node.
func containerPID(t *testing.T, c *Cluster, p corev1.Pod, container string) int {
	t.Helper()
	var id string
	for _, s := range p.Status.ContainerStatuses {
		if s.Name == container {
			_, id, _ = strings.Cut(s.ContainerID, "://")
		}
	}
	if id == "" {
		t.Fatalf("pod %s has no container %s running", p.Name, container)
	}
	n := c.Node(p.Spec.NodeName)
	files, _ := filepath.Glob(filepath.Join(cgroupFS, "pids", n.CgroupRoot, "kubepods", "*", "pod"+string(p.UID), id, "cgroup.procs"))
	more, _ := filepath.Glob(filepath.Join(cgroupFS, "pids", n.CgroupRoot, "kubepods", "pod"+string(p.UID), id, "cgroup.procs"))
	for _, f := range append(files, more...) {
		b, _ := os.ReadFile(f)
		if fs := strings.Fields(string(b)); len(fs) > 0 {
			pid, err := strconv.Atoi(fs[0])
			if err == nil {
				return pid
			}
		}
	}
	t.Fatalf("no process of container %s of pod %s", container, p.Name)
	return 0
}

func capField(t *testing.T, status, field string) uint64 {
	t.Helper()
	for line := range strings.Lines(status) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/<pid>/status", field)
	return 0
}

// TestAnnotatedNamespaceIsMeshedOnRealNodes: annotating a namespace meshes
// the pods that a real CNI wired: a client pod on node 1 reaches an echo
// pod on node 2 by pod IP and by ClusterIP Service, the echo sees the
// client's pod IP, and on the underlay only TLS 1.3 to the echo pod's port
// 15008 crosses between them, the marker never in clear (the capture first
// proves it sees the marker when the namespace is not meshed). The pods
// get the Meshed condition. A MeshPolicy applied through the API denies,
// and allows, as the policy model says.
func TestAnnotatedNamespaceIsMeshedOnRealNodes(t *testing.T) {
	c := meshed(t)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	const ns = "shop"
	createNamespace(ctx, t, c, ns, nil)
	for _, sa := range []string{"client", "echo"} {
		if _, err := c.Admin().CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ep := echoPod(ns, "echo", n2.Name)
	ep.Spec.ServiceAccountName = "echo"
	cp := idlePod(ns, "client", n1.Name)
	cp.Spec.ServiceAccountName = "client"
	createPod(ctx, t, c, ep)
	createPod(ctx, t, c, cp)
	echo := waitRunning(ctx, t, c, ns, "echo")
	client := waitPod(ctx, t, c, ns, "client", "Running", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" })
	svc, err := c.Admin().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(echoPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	podAddr := net.JoinHostPort(echo.Status.PodIP, strconv.Itoa(echoPort))
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	waitServiceProgrammed(ctx, t, c, n1, svc.Spec.ClusterIP)

	// Not meshed yet: the capture sees the marker in clear.
	marker := newMarker(t)
	stop := capture(t, c)
	if _, err := talk(ctx, c, client, podAddr, marker); err != nil {
		t.Fatalf("unmeshed: %v", err)
	}
	if pkts := stop(); !testbed.Contains(pkts, []byte(marker)) {
		t.Fatal("the capture did not see an unmeshed marker in clear: it would prove nothing")
	}

	setNamespaceAnnotations(ctx, t, c, ns, map[string]string{"mantlet.io/mesh": "enabled"})
	for _, name := range []string{"client", "echo"} {
		waitPod(ctx, t, c, ns, name, "Meshed", meshedCondition)
	}
	clientIP, echoIP := netip.MustParseAddr(client.Status.PodIP), netip.MustParseAddr(echo.Status.PodIP)
	defer logFlowsOnFailure(t, c, n1, client.Status.PodIP)
	conns := HBONEConns{} // the flow to the Service may ride the connection opened for the first
	for _, target := range []string{podAddr, vip} {
		if err := c.WaitAgentMeshes(ctx, n1, client.Status.PodIP, target, echoIP); err != nil {
			t.Fatal(err)
		}
		marker := newMarker(t)
		stop := capture(t, c)
		greeting, err := talk(ctx, c, client, target, marker)
		if err != nil {
			t.Fatalf("meshed, to %s: %v", target, err)
		}
		pkts := stop()
		if want := "hello from echo to " + client.Status.PodIP + ":"; !strings.HasPrefix(greeting, want) {
			t.Errorf("to %s: greeting %q, want %q... (the echo sees the client's pod IP)", target, greeting, want)
		}
		if testbed.Contains(pkts, []byte(marker)) {
			t.Errorf("to %s: the marker crossed the underlay in clear", target)
		}
		checkOnlyHBONE(t, pkts, conns, clientIP, echoIP, target)
	}

	// Policy through the API: a DENY on the port, then an ALLOW for
	// another identity only, then one for the client's.
	dyn, err := dynamic.NewForConfig(c.API.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	mp := dyn.Resource(mkube.MeshPolicies).Namespace(ns)
	apply := func(name string, spec map[string]any) {
		t.Helper()
		u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
			"metadata": map[string]any{"namespace": ns, "name": name}, "spec": spec}}
		if _, err := mp.Create(ctx, u, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	remove := func(name string) {
		t.Helper()
		if err := mp.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	principal := func(sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }
	steps := []struct {
		what    string
		do      func()
		allowed bool
	}{
		{"DENY on the echo's port", func() {
			apply("deny-echo", map[string]any{"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{strconv.Itoa(echoPort)}}}}})
		}, false},
		{"the DENY removed", func() { remove("deny-echo") }, true},
		{"ALLOW for another identity only", func() {
			apply("allow-other", map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "echo"}}, "action": "ALLOW",
				"rules": []any{map[string]any{"from": []any{map[string]any{"principals": []any{principal("someone-else")}}}}}})
		}, false},
		{"ALLOW for the client's identity too", func() {
			apply("allow-client", map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "echo"}}, "action": "ALLOW",
				"rules": []any{map[string]any{"from": []any{map[string]any{"principals": []any{principal("client")}}}}}})
		}, true},
	}
	for _, s := range steps {
		s.do()
		var last string
		ok := false
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			_, err := talk(ctx, c, client, podAddr, "policy")
			last = fmt.Sprint(err)
			if (err == nil) == s.allowed {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("%s: want allowed=%v; last attempt: %s", s.what, s.allowed, last)
		}
	}
}

// checkOnlyHBONE fails t unless every TCP stream between the two pods'
// addresses on the underlay is HBONE (HBONEConns.Check), one of them
// carried the flow, and no stream involves only one of the pods.
func checkOnlyHBONE(t *testing.T, pkts []testbed.Packet, conns HBONEConns, client, server netip.Addr, target string) {
	t.Helper()
	for _, s := range testbed.Streams(pkts) {
		a, b := s.Src.Addr(), s.Dst.Addr()
		if (a == client || b == client || a == server || b == server) && !(a == client && b == server) && !(a == server && b == client) {
			t.Errorf("to %s: a stream %s -> %s involves a pod but not both", target, s.Src, s.Dst)
		}
	}
	n, err := conns.Check(pkts, client, server)
	if err != nil {
		t.Errorf("to %s: %v", target, err)
	}
	if n == 0 {
		t.Errorf("to %s: no HBONE connection from %s to %s:15008 carried the flow on the underlay", target, client, server)
	}
}

func setNamespaceAnnotations(ctx context.Context, t *testing.T, c *Cluster, name string, ann map[string]string) {
	t.Helper()
	ns, err := c.Admin().CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Annotations = ann
	if _, err := c.Admin().CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}
