package meshtest

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

var binary string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if binary = os.Getenv(BinaryEnv); binary == "" && os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "meshtest-bin-*")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if binary, err = Build(ctx, dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return m.Run()
}

// TestMeshCarriesAMeshedConnectionAndCleansUp starts a two-node mesh,
// sends bytes through it from a meshed pod to a meshed pod of the other
// node, restarts an agent gracefully, and checks that Close leaves no
// namespace, pin or process behind.
func TestMeshCarriesAMeshedConnectionAndCleansUp(t *testing.T) {
	privtest.Require(t)
	ctx := context.Background()
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "a", Namespace: "shop", ServiceAccount: "sa-a"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "b", Namespace: "shop", ServiceAccount: "sa-b"}}},
		},
		Namespaces: map[string]map[string]string{"shop": {MeshAnnotation: "enabled"}},
	}
	m, err := Start(ctx, spec, Options{Binary: binary})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			m.Close()
		}
	})
	echo, err := m.Echo(ctx, "b", 7000)
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	c, err := m.Dial(ctx, "a", echo.Addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	c.Close()
	cnt, err := m.Counters("node1")
	if err != nil {
		t.Fatal(err)
	}
	if cnt.LookupOutbound == 0 {
		t.Errorf("node1 counters %+v: want a captured outbound connection", cnt)
	}
	f, err := m.WaitFlow(ctx, "node2", func(f Flow) bool { return f.Direction == "inbound" && f.Dst == echo.Addr })
	if err != nil {
		t.Fatalf("%v\n%s", err, m.Logs("node2"))
	}
	if f.SrcID != "spiffe://cluster.local/ns/shop/sa/sa-a" || f.DstID != "spiffe://cluster.local/ns/shop/sa/sa-b" {
		t.Errorf("flow %+v: wrong identities", f)
	}
	a, err := m.AttachedPrograms("node1", m.Pod("a").HostVeth)
	if err != nil || a != (Attached{Ingress: 1, Egress: 1}) {
		t.Errorf("attached on a's veth = %+v, %v; want one per hook", a, err)
	}
	// A graceful restart: SIGTERM, a clean exit, a new agent that settles
	// and carries traffic.
	if err := m.StopAgent(ctx, "node2"); err != nil {
		t.Fatalf("StopAgent: %v", err)
	}
	if m.Running("node2") {
		t.Fatal("node2's agent runs after StopAgent")
	}
	if err := m.StartAgent(ctx, "node2"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(m.AllLogs("node2"), "meshtest: agent run ended (<nil>)") {
		t.Errorf("node2's history does not record the clean exit:\n%s", m.AllLogs("node2"))
	}
	c, err = m.Dial(ctx, "a", echo.Addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "again"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "again" {
		t.Fatalf("echo after the restart = %q, %v", buf, err)
	}
	c.Close()

	prefix := m.TB.Prefix()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if left, _ := filepath.Glob(filepath.Join("/run/netns", prefix+"-*")); len(left) > 0 {
		t.Errorf("namespaces left after Close: %v", left)
	}
	if left, _ := filepath.Glob(filepath.Join("/sys/fs/bpf/mantlet", prefix+"-*")); len(left) > 0 {
		t.Errorf("pins left after Close: %v", left)
	}
	if m.Running("node1") || m.Running("node2") {
		t.Error("agents still running after Close")
	}
}

func TestLogBufferKeepsTheStartAndTheEnd(t *testing.T) {
	l := newLogBuffer(400)
	for i := range 100 {
		l.Write([]byte(strings.Repeat("x", 9) + string(rune('0'+i%10)) + "\n"))
	}
	s := l.String()
	if len(s) > 500 || !strings.HasPrefix(s, "xxxxxxxxx0\n") || !strings.HasSuffix(s, "xxxxxxxxx9\n") || !strings.Contains(s, "bytes of log dropped") {
		t.Fatalf("kept %d bytes:\n%s", len(s), s)
	}
}

// TestStartRemovesEverythingWhenAnAgentFails starts a mesh whose agents
// cannot start (a bad flag): Start fails with the agent's own complaint
// and leaves no namespace of its testbed behind.
func TestStartRemovesEverythingWhenAnAgentFails(t *testing.T) {
	privtest.Require(t)
	prefix := fmt.Sprintf("mtfail%d", os.Getpid()%1000000)
	m, err := Start(context.Background(), testbed.SimpleSpec(2, 1, "shop"), Options{Binary: binary, Prefix: prefix, AgentArgs: []string{"--mtls-mode", "SOMETIMES"}})
	if err == nil {
		m.Close()
		t.Fatal("Start succeeded with agents that cannot start")
	}
	if !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "--mtls-mode") {
		t.Errorf("error does not say that the agent exited and why:\n%v", err)
	}
	if left, _ := filepath.Glob("/run/netns/" + prefix + "-*"); len(left) > 0 {
		t.Errorf("namespaces left after Start failed: %v", left)
	}
}

// TestAgentsRunThroughAWrapperWithExtraEnvironment runs the agents as
// `env <mantlet> agent ...` with BinaryArgs and checks that they settle,
// carry Env, and are cleaned up the same way.
func TestAgentsRunThroughAWrapperWithExtraEnvironment(t *testing.T) {
	privtest.Require(t)
	wrapper, err := exec.LookPath("env")
	if err != nil {
		t.Skip("no env command")
	}
	m, err := Start(context.Background(), testbed.SimpleSpec(1, 1, "shop"), Options{
		Binary: wrapper, BinaryArgs: []string{binary}, Env: []string{"MESHTEST_MARK=wrapped"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	p, err := m.proc("node1")
	if err != nil {
		t.Fatal(err)
	}
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(environ), "MESHTEST_MARK=wrapped") {
		t.Error("the agent's environment lacks Options.Env")
	}
	pins := m.PinDir("node1")
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pins); err == nil {
		t.Errorf("pins %s left after Close", pins)
	}
}
