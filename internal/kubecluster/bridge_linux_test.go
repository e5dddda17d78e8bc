package kubecluster

import (
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mantlet/mantlet/agent"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// TestBridgedCNIIsRefusedLoudly: on a cluster whose CNI is the
// reference `bridge` plugin (every pod of a node a port of cni0, the
// node's route to its pods the subnet route of cni0), mantlet cannot
// capture pods: pods of one node talk through the bridge without being
// routed, past the ztunnel. So a pod of a meshed namespace is never
// started uncaptured: the agent refuses it, and the user sees why
// everywhere they look: the sandbox's event carries the plugin's message
// "bridged CNI is not supported" (at once, not after the plugin's
// timeout), the pod's mantlet.io/Meshed condition is False with reason
// BridgedCNINotSupported, the agent's metric counts it, and 'mantlet
// status' (the admin API) names the pod. The pod stays held: no address,
// no container.
func TestBridgedCNIIsRefusedLoudly(t *testing.T) {
	ctx, c := ownClusterWithMantlet(t, "bridge cluster", Options{CNI: CNIBridge})

	const ns = "bridged"
	node := c.Nodes[0]
	admin := c.Admin()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
		Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	created, err := admin.CoreV1().Pods(ns).Create(ctx, idlePod(ns, "client", node.Name), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// The sandbox fails with the plugin's message, well before the
	// plugin's timeout (cni.DefaultTimeout) would have ended it.
	var event *corev1.Event
	err = retry(ctx, 2*time.Minute, func() error {
		evs, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=client"})
		if err != nil {
			return err
		}
		for i, e := range evs.Items {
			if e.Reason == "FailedCreatePodSandBox" {
				event = &evs.Items[i]
				return nil
			}
		}
		return fmt.Errorf("no FailedCreatePodSandBox event yet (%d events)", len(evs.Items))
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"refused by the agent (" + agent.ReasonBridgedCNI + ")", "leaves through cni0, a bridge", agent.ErrBridgedCNI.Error()} {
		if !strings.Contains(event.Message, want) {
			t.Errorf("the sandbox's event says %q; want it to say %q", event.Message, want)
		}
	}
	if strings.Contains(event.Message, "not enrolled within") {
		t.Errorf("the plugin waited for its timeout: %q", event.Message)
	}

	// The pod's condition, and the pod held.
	p, err := c.waitPod(ctx, ns, "client", func(p *corev1.Pod) bool {
		for _, cond := range p.Status.Conditions {
			if cond.Type == mkube.ConditionMeshed {
				return cond.Status == corev1.ConditionFalse && cond.Reason == agent.ReasonBridgedCNI
			}
		}
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, cond := range p.Status.Conditions {
		if cond.Type == mkube.ConditionMeshed && !strings.Contains(cond.Message, agent.ErrBridgedCNI.Error()) {
			t.Errorf("Meshed condition message %q; want it to say %q", cond.Message, agent.ErrBridgedCNI.Error())
		}
	}
	if p.Status.PodIP != "" || p.Status.Phase != corev1.PodPending || len(p.Status.ContainerStatuses) > 0 && p.Status.ContainerStatuses[0].State.Running != nil {
		t.Errorf("the refused pod is not held: phase %s, IP %q", p.Status.Phase, p.Status.PodIP)
	}
	t.Logf("pod created %s; FailedCreatePodSandBox event %s later", created.CreationTimestamp.Format(time.RFC3339), event.LastTimestamp.Sub(created.CreationTimestamp.Time))

	// The agent's metric and 'mantlet status', from the node.
	hc := node.adminClient()
	get := func(url string) string {
		t.Helper()
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatalf("GET %s on %s: %v", url, node.Name, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		return string(b)
	}
	metrics := get("http://127.0.0.1:15020/metrics")
	found := false
	for line := range strings.Lines(metrics) {
		if strings.HasPrefix(line, `mantlet_agent_refused_pods_total{reason="`+agent.ReasonBridgedCNI+`"} `) && !strings.HasSuffix(strings.TrimSpace(line), " 0") {
			found = true
		}
	}
	if !found {
		t.Errorf("the agent's metrics count no refused pod:\n%s", grepLines(metrics, "mantlet_agent_refused_pods_total"))
	}
	var status struct {
		Problems []string `json:"problems"`
	}
	err = retry(ctx, 30*time.Second, func() error {
		if err := getJSON(ctx, hc, "http://"+AdminAddr+"/v1/status", &status); err != nil {
			return err
		}
		for _, pr := range status.Problems {
			if strings.HasPrefix(pr, "pod "+ns+"/client refused ("+agent.ReasonBridgedCNI+"), not captured: ") && strings.Contains(pr, agent.ErrBridgedCNI.Error()) {
				return nil
			}
		}
		return fmt.Errorf("mantlet status names no refused pod: %q", status.Problems)
	})
	if err != nil {
		t.Error(err)
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		if strings.Contains(line, sub) {
			b.WriteString(line)
		}
	}
	return b.String()
}
