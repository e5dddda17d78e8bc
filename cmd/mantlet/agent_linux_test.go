package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// TestAgentHelperProcess is not a test: it is `mantlet` when the test binary
// is started by agentProcess.
func TestAgentHelperProcess(t *testing.T) {
	if os.Getenv("MANTLET_AGENT_HELPER") != "1" {
		t.Skip("runs only as a helper process")
	}
	args := os.Args
	for i, a := range args {
		if a == "--" {
			args = args[i+1:]
			break
		}
	}
	ctx, _ := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	os.Exit(run(ctx, newEnv(), args))
}

// lockedBuffer collects a process's output for the test to read while the
// process runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type agentProc struct {
	node *testbed.Node
	cmd  *exec.Cmd
	logs *lockedBuffer
	done chan struct{} // closed when the process exited, then err is set
	err  error
}

// startAgent runs `mantlet agent` for node inside its namespace until the
// test ends.
func startAgent(t *testing.T, node *testbed.Node, args ...string) *agentProc {
	t.Helper()
	argv := append([]string{"-test.run=^TestAgentHelperProcess$", "--", "agent", "--node-name", node.Name}, args...)
	cmd := node.Command(context.Background(), os.Args[0], argv...)
	cmd.Env = append(os.Environ(), "MANTLET_AGENT_HELPER=1")
	p := &agentProc{node: node, logs: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	p.cmd = cmd
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("agent %s logs:\n%s", node.Name, p.logs)
		}
	})
	return p
}

// stop sends SIGTERM and waits for the agent to exit.
func (p *agentProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("agent %s exited with %v; logs:\n%s", p.node.Name, p.err, p.logs)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("agent %s did not exit within 20s of SIGTERM", p.node.Name)
	}
}

// get fetches http://127.0.0.1<port><path> inside the node's namespace.
func (p *agentProc) get(port, path string) (int, string, error) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return p.node.Dial(ctx, network, addr)
		},
	}}
	resp, err := client.Get("http://127.0.0.1" + port + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// waitReady waits until the readiness probe answers 200 with want.
func (p *agentProc) waitReady(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var code int
	var body string
	var err error
	for time.Now().Before(deadline) {
		if code, body, err = p.get(":15021", "/healthz/ready"); err == nil && code == 200 && body == want {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent %s: readiness = %d %q (%v), want 200 %q; logs:\n%s", p.node.Name, code, body, err, want, p.logs)
}

func writeFileAtomically(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// newAgentTestbed builds spec (root only) with a CA and the cluster file
// of the testbed, and removes it when the test ends.
func newAgentTestbed(t *testing.T, spec testbed.Spec) (tb *testbed.Testbed, caDir, config string) {
	t.Helper()
	privtest.Require(t)
	tb, err := testbed.New(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("testbed close: %v", err)
		}
	})
	dir := t.TempDir()
	caDir = filepath.Join(dir, "ca")
	if _, err := ca.Init(caDir, spiffeid.RequireTrustDomainFromString("cluster.local"), ca.Options{}); err != nil {
		t.Fatal(err)
	}
	config = filepath.Join(dir, "cluster.yaml")
	writeFileAtomically(t, config, tb.Manifest())
	return tb, caDir, config
}

// TestAgentRunsNodesOfTheTestbed runs the real command on two nodes of a
// testbed: the agents get ready, a meshed pod's connection to a pod of the
// other node is captured and arrives from the client's own IP, a restarted
// agent adopts its pins, an edit of the file un-enrolls a pod, and
// --cleanup removes the pins.
func TestAgentRunsNodesOfTheTestbed(t *testing.T) {
	ctx := context.Background()
	tb, caDir, config := newAgentTestbed(t, testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server"}, {Name: "legacy", Namespace: "plain"}}},
		},
		Namespaces: map[string]map[string]string{"shop": {"mantlet.io/mesh": "enabled"}},
	})
	pinDir := func(n *testbed.Node) string { return filepath.Join(bpf.DefaultPinRoot, tb.Prefix()+"-"+n.Name) }
	for _, n := range tb.Nodes() {
		t.Cleanup(func() {
			cmd := n.Command(ctx, os.Args[0], "-test.run=^TestAgentHelperProcess$", "--", "agent", "--cleanup", "--node-name", n.Name, "--pin-dir", pinDir(n))
			cmd.Env = append(os.Environ(), "MANTLET_AGENT_HELPER=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Errorf("cleanup of %s: %v\n%s", n.Name, err, out)
			}
		})
	}
	start := func(n *testbed.Node) *agentProc {
		return startAgent(t, n, "--config", config, "--ca-dir", caDir, "--pin-dir", pinDir(n), "--config-poll", "200ms")
	}
	node1, node2 := tb.Node("node1"), tb.Node("node2")
	started := time.Now()
	a1, a2 := start(node1), start(node2)
	a1.waitReady(t, "ready: 1 local pods enrolled, 0 pending, 1 veths attached")
	t.Logf("start to ready: %v", time.Since(started).Round(time.Millisecond))
	a2.waitReady(t, "ready: 1 local pods enrolled, 0 pending, 1 veths attached")

	// A meshed pod talks to a meshed pod of the other node.
	client, server := tb.Pod("client"), tb.Pod("server")
	ln, err := server.Listen(ctx, "tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "from %s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	exchange := func() string {
		t.Helper()
		c, err := client.Dial(ctx, "tcp", net.JoinHostPort(server.IP.String(), "8080"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := exchange(); !strings.HasPrefix(got, "from "+client.IP.String()+":") {
		t.Fatalf("server answered %q; want it to see the client's IP %s", got, client.IP)
	}
	metric := regexp.MustCompile(`(?m)^mantlet_datapath_packets_total\{event="lookup_outbound"\} ([1-9][0-9]*)$`)
	if _, body, err := a1.get(":15020", "/metrics"); err != nil || !metric.MatchString(body) {
		t.Fatalf("node1 metrics show no captured outbound connection (%v):\n%s", err, body)
	}

	// A restarted agent adopts what the first one pinned.
	a1.stop(t)
	if !strings.Contains(a1.logs.String(), "agent stopped") {
		t.Fatalf("node1 agent did not log its stop:\n%s", a1.logs)
	}
	a1 = start(node1)
	a1.waitReady(t, "ready: 1 local pods enrolled, 0 pending, 1 veths attached")
	if !strings.Contains(a1.logs.String(), "adopted=true") {
		t.Fatalf("restarted agent did not adopt the pinned pod:\n%s", a1.logs)
	}
	if got := exchange(); !strings.HasPrefix(got, "from "+client.IP.String()+":") {
		t.Fatalf("after the restart the server answered %q", got)
	}

	// Opting the client out in the file un-enrolls it without a restart.
	tb.SetPodAnnotations("client", map[string]string{"mantlet.io/mesh": "disabled"})
	edited := time.Now()
	writeFileAtomically(t, config, tb.Manifest())
	a1.waitReady(t, "ready: 0 local pods enrolled, 0 pending, 0 veths attached")
	t.Logf("edit to un-enrolled (seen by the probe): %v", time.Since(edited).Round(time.Millisecond))
	a1.stop(t)
	a2.stop(t)
}

// TestAgentRollsBackAFailedStart: an agent that fails after it loaded its
// data path (here: the outbound port is taken) removes what it made, so
// nothing of a failed start stays attached, routed or pinned.
func TestAgentRollsBackAFailedStart(t *testing.T) {
	ctx := context.Background()
	tb, caDir, config := newAgentTestbed(t, testbed.Spec{
		Nodes:      []testbed.NodeSpec{{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop"}}}},
		Namespaces: map[string]map[string]string{"shop": {"mantlet.io/mesh": "enabled"}},
	})
	node := tb.Node("node1")
	busy, err := node.Listen(ctx, "tcp", ":15001")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	pins := filepath.Join(bpf.DefaultPinRoot, tb.Prefix()+"-node1")
	t.Cleanup(func() { _, _ = bpf.Cleanup(ctx, pins) }) // only if the test fails

	a := startAgent(t, node, "--config", config, "--ca-dir", caDir, "--pin-dir", pins)
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent did not exit with its port taken")
	}
	logs := a.logs.String()
	if a.err == nil || !strings.Contains(logs, "listen :15001 (outbound)") || !strings.Contains(logs, "rolled the data path back: "+pins+": ") {
		t.Fatalf("agent exit %v; want a failure on :15001 and a roll-back; logs:\n%s", a.err, logs)
	}
	if _, err := os.Stat(pins); !os.IsNotExist(err) {
		t.Errorf("pins after the failed start: %v", err)
	}
	out, err := node.Command(ctx, "ip", "-4", "rule", "show", "priority", fmt.Sprint(bpf.DefaultRulePriority)).Output()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("routing rule after the failed start: %q (%v)", out, err)
	}
	if out, err := node.Command(ctx, "ip", "-4", "route", "show", "table", fmt.Sprint(bpf.DefaultRouteTable)).Output(); err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("capture table after the failed start: %q (%v)", out, err)
	}
}
