package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
	"github.com/mantlet/mantlet/source/file"
)

// TestAgentKeepsTheMeshWhenAnEditIsRejected runs the real command on a
// node and rewrites its cluster file the way a shell's
// `kubectl get … -o yaml > cluster.yaml` does, stopping while the file is
// empty: the pod stays enrolled, the node stays ready, and mantlet status
// and the metrics say that the edit was rejected. The file written back
// clears that; a misspelt kind is rejected the same way.
func TestAgentKeepsTheMeshWhenAnEditIsRejected(t *testing.T) {
	privtest.Require(t)
	ctx := context.Background()
	tb, err := testbed.New(ctx, testbed.Spec{
		Nodes:      []testbed.NodeSpec{{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}}},
		Namespaces: map[string]map[string]string{"shop": {"mantlet.io/mesh": "enabled"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("testbed close: %v", err)
		}
	})
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if _, err := ca.Init(caDir, spiffeid.RequireTrustDomainFromString("cluster.local"), ca.Options{}); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "cluster.yaml")
	good := tb.Manifest()
	writeFileAtomically(t, config, good)
	node := tb.Node("node1")
	pinDir := filepath.Join(bpf.DefaultPinRoot, tb.Prefix()+"-node1")
	t.Cleanup(func() {
		cmd := node.Command(ctx, os.Args[0], "-test.run=^TestAgentHelperProcess$", "--", "agent", "--cleanup", "--node-name", node.Name, "--pin-dir", pinDir)
		cmd.Env = append(os.Environ(), "MANTLET_AGENT_HELPER=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("cleanup of %s: %v\n%s", node.Name, err, out)
		}
	})
	a := startAgent(t, node, "--config", config, "--ca-dir", caDir, "--pin-dir", pinDir, "--config-poll", "200ms")
	const ready = "ready: 1 local pods enrolled, 0 pending, 1 veths attached"
	a.waitReady(t, ready)
	sock := admin.SocketPath(filepath.Base(pinDir))
	c, err := admin.NewClient(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// waitConfig waits until the admin API's status says whether the last
	// edit is rejected, and returns that status.
	waitConfig := func(rejected bool) admin.Status {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			st, err := c.Status(ctx)
			if err == nil && st.Config.LastEditRejected == rejected {
				return st
			}
			if time.Now().After(deadline) {
				t.Fatalf("status never showed last_edit_rejected=%v: %+v, %v; logs:\n%s", rejected, st.Config, err, a.logs)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// stillMeshed checks that the node is ready with its pod enrolled, and
	// what the metric says of the last reload.
	stillMeshed := func(success string) {
		t.Helper()
		if code, body, err := a.get(":15021", "/healthz/ready"); err != nil || code != 200 || body != ready {
			t.Fatalf("readiness = %d %q (%v); want 200 %q", code, body, err, ready)
		}
		_, metrics, err := a.get(":15020", "/metrics")
		if want := regexp.MustCompile(`(?m)^mantlet_config_last_reload_success ` + success + `$`); err != nil || !want.MatchString(metrics) {
			t.Fatalf("metrics (%v) lack %s:\n%s", err, want, metrics)
		}
	}

	// The shell's ">" empties the file; the command that writes it has not
	// written anything yet.
	if err := os.Truncate(config, 0); err != nil {
		t.Fatal(err)
	}
	st := waitConfig(true)
	if want := []string{"cluster.yaml: " + file.NoObjects}; strings.Join(st.Config.LastEditProblems, "\n") != strings.Join(want, "\n") || !st.Ready {
		t.Fatalf("status after emptying the file = %+v; want ready and the problem %q", st, want)
	}
	stillMeshed("0")
	e, out, errb := testEnv()
	if code := run(ctx, e, []string{"status", "--admin", sock}); code != 0 ||
		!strings.Contains(out.String(), "\n  - config: last edit rejected at ") || !strings.Contains(out.String(), file.NoObjects) {
		t.Fatalf("mantlet status exited %d; stdout:\n%s\nstderr:\n%s", code, out, errb)
	}

	// The command writes the file: the same cluster as before.
	if err := os.WriteFile(config, good, 0o600); err != nil {
		t.Fatal(err)
	}
	waitConfig(false)
	stillMeshed("1")

	// A misspelt kind is rejected too, and nothing of the file is applied.
	bad := strings.Replace(string(good), "kind: Pod\n", "kind: Pods\n", 1)
	if bad == string(good) {
		t.Fatalf("the testbed's file has no \"kind: Pod\" line:\n%s", good)
	}
	writeFileAtomically(t, config, []byte(bad))
	st = waitConfig(true)
	if len(st.Config.LastEditProblems) != 1 || !strings.Contains(st.Config.LastEditProblems[0], `kind "Pods": core v1 has no such kind; did you mean Pod?`) {
		t.Fatalf("problems of the misspelt kind: %q", st.Config.LastEditProblems)
	}
	stillMeshed("0")
	a.stop(t)
}
