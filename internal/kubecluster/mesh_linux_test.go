package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/mantlet/mantlet/internal/testbed"
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
			n := c.Node(p.Spec.NodeName)
			files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", p.Namespace+"_"+p.Name+"_"+string(p.UID), "agent", "*.log"))
			var b strings.Builder
			for _, f := range files {
				data, _ := os.ReadFile(f)
				b.Write(data)
			}
			if b.Len() > 0 {
				return b.String()
			}
		}
	}
	return ""
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
