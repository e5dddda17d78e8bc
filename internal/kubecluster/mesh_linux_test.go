package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
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
