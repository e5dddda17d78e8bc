package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/mantlet/mantlet/internal/testbed"
)

// cniAnswer is the agent's log line for one answer to its CNI plugin.
type cniAnswer struct {
	Time    time.Time `json:"time"`
	Pod     string    `json:"pod"`
	Command string    `json:"command"`
	Meshed  bool      `json:"meshed"`
	Ifindex int       `json:"ifindex"`
}

// cniAnswers reads the answers that the agents on node gave their CNI
// plugin for pod (namespace/name), from the node's pod log folder (the
// chart logs JSON; the runtime prefixes each line with its time, stream
// and tag).
func cniAnswers(t *testing.T, c *Cluster, node, pod string) []cniAnswer {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(c.Node(node).Dir, "pod-logs", MeshNamespace+"_*", "agent", "*.log"))
	var out []cniAnswer
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			if !strings.Contains(line, `"msg":"cni: pod answered"`) || !strings.Contains(line, `"pod":"`+pod+`"`) {
				continue
			}
			_, js, ok := strings.Cut(line, "{")
			var a cniAnswer
			if ok && json.Unmarshal([]byte("{"+js), &a) == nil {
				out = append(out, a)
			}
		}
	}
	return out
}

// containerLog is what a pod's container wrote, from its node's pod log
// folder (the runtime's prefix of each line kept).
func containerLog(c *Cluster, p *corev1.Pod, container string) string {
	files, _ := filepath.Glob(filepath.Join(c.Node(p.Spec.NodeName).Dir, "pod-logs", p.Namespace+"_"+p.Name+"_"+string(p.UID), container, "*.log"))
	var b strings.Builder
	for _, f := range files {
		data, _ := os.ReadFile(f)
		b.Write(data)
	}
	return strings.TrimSpace(b.String())
}

// TestNewPodsFirstConnectionIsNeverPlaintext: a client container that
// connects the moment it starts, in a meshed namespace, with the agent
// already running. Its sandbox is held by mantlet's CNI plugin until the
// agent has enrolled the pod's veth (the agent's answer says meshed, and
// comes before the container started), so its connection is meshed (only
// HBONE between the two pods on the underlay) and its marker never
// crosses it in clear, over several rounds (a
// new pod, address and veth each).
func TestNewPodsFirstConnectionIsNeverPlaintext(t *testing.T) {
	c := meshed(t)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	const ns = "newpods"
	for _, n := range c.Nodes {
		// The node's network as its runtime reads it, through the
		// runtime's own mount namespace.
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root%s/10-kubecluster.conflist", n.containerd.Pid(), NodeCNIConfDir))
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Plugins []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(b, &list); err != nil || len(list.Plugins) != 2 || list.Plugins[1].Type != "mantlet-cni" {
			t.Fatalf("node %s's network: %s (%v), want ptp then mantlet-cni", n.Name, b, err)
		}
	}
	echoAddr := meshedNamespace(ctx, t, c, ns)
	echoIP := netip.MustParseAddrPort(echoAddr).Addr()
	node := c.Nodes[0].Name
	const rounds = 5
	for round := range rounds {
		marker := newMarker(t)
		stop := capture(t, c)
		name := fmt.Sprintf("first-%d", round)
		createPod(ctx, t, c, clientPod(ns, name, node, echoAddr, marker))
		p := waitPod(ctx, t, c, ns, name, "finished", func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
		})
		pkts := stop()
		if testbed.Contains(pkts, []byte(marker)) {
			t.Errorf("round %d: a new pod's first connection crossed the underlay in clear", round)
		}
		answers := cniAnswers(t, c, node, ns+"/"+name)
		if len(answers) == 0 {
			t.Fatalf("round %d: the agent on %s never answered its CNI plugin for %s/%s: the pod was not held", round, node, ns, name)
		}
		a := answers[len(answers)-1]
		var started time.Time
		for _, s := range p.Status.ContainerStatuses {
			if x := s.State.Terminated; x != nil {
				started = x.StartedAt.Time
			}
		}
		// The container's start time has seconds only: the answer must
		// come no later than that second's end.
		if !a.Meshed || a.Ifindex == 0 || started.IsZero() || a.Time.After(started.Add(time.Second)) {
			t.Errorf("round %d: the agent answered %+v, the container started at %v: want meshed on a veth, before the start", round, a, started)
		}
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("round %d: the client did not complete its meshed exchange: %s; it said: %s", round, podSummary(p), containerLog(c, p, "client"))
		} else {
			// A new pod, so a new HBONE connection (pooled per client
			// address), its handshake in the capture. (Earlier rounds'
			// pods' connections to the echo may still close meanwhile.)
			n, err := HBONEConns{}.Check(pkts, netip.MustParseAddr(p.Status.PodIP), echoIP)
			if err != nil || n == 0 {
				t.Errorf("round %d: %d HBONE connections from the client to the echo on the underlay (%v), want every stream between them HBONE, at least one", round, n, err)
			}
		}
		t.Logf("round %d: the agent enrolled %s/%s on veth %d and answered at %s; the container started at %s",
			round, ns, name, a.Ifindex, a.Time.Format("15:04:05.000"), started.Format("15:04:05"))
	}
}

// TestNewMeshedPodWaitsForTheAgent: with no agent on the nodes (the
// DaemonSet scheduled nowhere), a new pod of a meshed namespace is not
// started: its sandbox fails with the plugin's message, and the kubelet
// tries again; a pod of kube-system (excluded) starts meanwhile. Once the
// agents are back, the held pod starts, enrolled before its container.
func TestNewMeshedPodWaitsForTheAgent(t *testing.T) {
	c := meshed(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	const ns = "held"
	createNamespace(ctx, t, c, ns, map[string]string{"mantlet.io/mesh": "enabled"})
	node := c.Nodes[0].Name
	ds := c.Admin().AppsV1().DaemonSets(MeshNamespace)
	setSelector := func(ctx context.Context, sel string) error {
		patch := fmt.Sprintf(`{"spec":{"template":{"spec":{"nodeSelector":%s}}}}`, sel)
		_, err := ds.Patch(ctx, AgentDaemonSet, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
		return err
	}
	orig, err := ds.Get(ctx, AgentDaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	origSel, _ := json.Marshal(orig.Spec.Template.Spec.NodeSelector)
	restored := false
	restore := func(ctx context.Context) error {
		// A strategic merge keeps keys it is not told to drop: remove the
		// one added, put the chart's back.
		if _, err := ds.Patch(ctx, AgentDaemonSet, types.JSONPatchType,
			[]byte(fmt.Sprintf(`[{"op":"replace","path":"/spec/template/spec/nodeSelector","value":%s}]`, origSel)), metav1.PatchOptions{}); err != nil {
			return err
		}
		restored = true
		return c.WaitAgentsReady(ctx)
	}
	t.Cleanup(func() {
		if !restored {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			if err := restore(ctx); err != nil {
				t.Errorf("restoring the agents: %v", err)
			}
		}
	})
	if err := setSelector(ctx, `{"mantlet.test/no-agent":"here"}`); err != nil {
		t.Fatal(err)
	}
	agents := c.Admin().CoreV1().Pods(MeshNamespace)
	sel := metav1.FormatLabelSelector(orig.Spec.Selector)
	for {
		l, err := agents.List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err == nil && len(l.Items) == 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the agents did not go away: %v", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	t.Log("no agent runs on any node")

	createPod(ctx, t, c, idlePod(ns, "held", node))
	excluded := idlePod("kube-system", "cni-excluded-"+strings.ToLower(c.Name), node)
	createPod(ctx, t, c, excluded)
	t.Cleanup(func() {
		_ = c.Admin().CoreV1().Pods("kube-system").Delete(context.Background(), excluded.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	})
	const want = "pod held/held not started: the mantlet agent did not enroll it"
	var msg string
	for msg == "" {
		evs, err := c.Admin().CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=held"})
		if err == nil {
			for _, e := range evs.Items {
				if e.Reason == "FailedCreatePodSandBox" && strings.Contains(e.Message, want) {
					msg = e.Message
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no FailedCreatePodSandBox event saying %q: %v", want, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	t.Logf("the kubelet reports: %s", msg)
	waitRunning(ctx, t, c, "kube-system", excluded.Name)
	t.Log("a kube-system pod started without the agent")
	p, err := c.Admin().CoreV1().Pods(ns).Get(ctx, "held", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != corev1.PodPending || p.Status.PodIP != "" {
		t.Fatalf("the meshed pod got going without an agent: %s", podSummary(p))
	}

	back := time.Now()
	if err := restore(ctx); err != nil {
		t.Fatal(err)
	}
	ready := time.Since(back)
	p = waitPod(ctx, t, c, ns, "held", "Running and Meshed", func(p *corev1.Pod) bool { return podReady(p) && meshedCondition(p) })
	t.Logf("the agents were Ready %s after they were asked back; the held pod was Running and Meshed after %s (the kubelet retries a failed sandbox with a backoff)",
		ready.Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
	answers := cniAnswers(t, c, node, ns+"/held")
	var started time.Time
	for _, s := range p.Status.ContainerStatuses {
		if r := s.State.Running; r != nil {
			started = r.StartedAt.Time
		}
	}
	if len(answers) == 0 || !answers[len(answers)-1].Meshed || answers[len(answers)-1].Time.After(started.Add(time.Second)) {
		t.Errorf("the new agent answered %+v; the container started at %v: want meshed, before the start", answers, started)
	}
}
