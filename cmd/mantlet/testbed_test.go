package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

func TestTestbedRejectsBadUsage(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no subcommand", []string{"testbed"}, "Usage: mantlet testbed"},
		{"unknown subcommand", []string{"testbed", "sideways"}, `unknown subcommand "sideways"`},
		{"zero nodes", []string{"testbed", "up", "--nodes", "0"}, "--nodes must be at least 1"},
		{"file and nodes", []string{"testbed", "up", "--file", "x.yaml", "--nodes", "3"}, "--file describes the whole cluster"},
		{"down without a target", []string{"testbed", "down"}, "give either --prefix P or --all"},
		{"down with both", []string{"testbed", "down", "--prefix", "a", "--all"}, "give either --prefix P or --all"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, _, errb := testEnv()
			if code := run(context.Background(), e, tt.args); code != 2 {
				t.Fatalf("exit code %d, want 2; stderr:\n%s", code, errb)
			}
			if !strings.Contains(errb.String(), tt.want) {
				t.Fatalf("stderr does not say %q:\n%s", tt.want, errb)
			}
		})
	}
}

func TestTestbedSubcommandsAnswerHelp(t *testing.T) {
	for _, sub := range []string{"up", "down", "list"} {
		e, _, errb := testEnv()
		if code := run(context.Background(), e, []string{"testbed", sub, "-h"}); code != 0 {
			t.Fatalf("testbed %s -h: exit code %d", sub, code)
		}
		if !strings.Contains(errb.String(), "Usage: mantlet testbed "+sub) {
			t.Errorf("testbed %s -h printed no usage line:\n%s", sub, errb)
		}
	}
}

func randomPrefix(t *testing.T, stem string) string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return stem + hex.EncodeToString(b[:])
}

func TestTestbedUpListDown(t *testing.T) {
	privtest.Require(t)
	dir := t.TempDir()
	prefix := randomPrefix(t, "tbcli")
	t.Cleanup(func() { _ = testbed.Remove(prefix, testbed.WithStateDir(dir)) })

	e, out, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "up", "--nodes", "2", "--pods-per-node", "1", "--mesh", "--prefix", prefix, "--state-dir", dir}); code != 0 {
		t.Fatalf("up: exit code %d; stderr:\n%s", code, errb)
	}
	for _, want := range []string{
		"testbed " + prefix + ": 2 nodes, 2 pods",
		"/run/netns/" + prefix + "-pod-pod-2-1",
		"198.19.2.11",
		"mantlet testbed down --prefix " + prefix,
		filepath.Join(dir, prefix+".yaml"),
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("up output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat("/run/netns/" + prefix + "-node-node2"); err != nil {
		t.Errorf("node namespace missing after up: %v", err)
	}
	manifest, err := os.ReadFile(filepath.Join(dir, prefix+".yaml"))
	if err != nil || !strings.Contains(string(manifest), "mantlet.io/mesh: enabled") || !strings.Contains(string(manifest), "podIP: 198.19.1.11") {
		t.Errorf("manifest (err %v):\n%s", err, manifest)
	}

	e, out, _ = testEnv()
	if code := run(context.Background(), e, []string{"testbed", "list", "--state-dir", dir}); code != 0 || !strings.Contains(out.String(), prefix) {
		t.Errorf("list: exit code %d, output:\n%s", code, out)
	}

	e, out, errb = testEnv()
	if code := run(context.Background(), e, []string{"testbed", "down", "--prefix", prefix, "--state-dir", dir}); code != 0 {
		t.Fatalf("down: exit code %d; stderr:\n%s", code, errb)
	}
	if !strings.Contains(out.String(), "removed testbed "+prefix) {
		t.Errorf("down output:\n%s", out)
	}
	left, _ := filepath.Glob("/run/netns/" + prefix + "-*")
	files, _ := os.ReadDir(dir)
	if len(left)+len(files) > 0 {
		t.Errorf("after down: namespaces %v, files %v", left, files)
	}
}

func TestTestbedUpFromFileAndDownAll(t *testing.T) {
	privtest.Require(t)
	dir := t.TempDir()
	prefixes := []string{randomPrefix(t, "tbf"), randomPrefix(t, "tbg")}
	t.Cleanup(func() {
		for _, p := range prefixes {
			_ = testbed.Remove(p, testbed.WithStateDir(dir))
		}
	})
	spec := filepath.Join(t.TempDir(), "spec.yaml")
	if err := os.WriteFile(spec, []byte(`nodes:
- name: west
  pods:
  - {name: client, namespace: shop, serviceAccount: buyer}
- name: east
  pods:
  - {name: server, namespace: shop, labels: {app: server}}
namespaces:
  shop: {mantlet.io/mesh: enabled}
services:
- {name: server, namespace: shop, selector: {app: server}, ports: [{port: 80, targetPort: 8080}]}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range prefixes {
		e, out, errb := testEnv()
		if code := run(context.Background(), e, []string{"testbed", "up", "--file", spec, "--prefix", p, "--state-dir", dir}); code != 0 {
			t.Fatalf("up --file: exit code %d; stderr:\n%s", code, errb)
		}
		for _, want := range []string{"shop/client", "198.19.2.11", "service", "198.18.128.1"} {
			if !strings.Contains(out.String(), want) {
				t.Errorf("up output lacks %q:\n%s", want, out)
			}
		}
	}
	e, out, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "down", "--all", "--state-dir", dir}); code != 0 {
		t.Fatalf("down --all: exit code %d; stderr:\n%s", code, errb)
	}
	for _, p := range prefixes {
		if !strings.Contains(out.String(), "removed testbed "+p) {
			t.Errorf("down --all did not report %s:\n%s", p, out)
		}
		if left, _ := filepath.Glob("/run/netns/" + p + "-*"); len(left) > 0 {
			t.Errorf("namespaces left: %v", left)
		}
	}
}

func TestTestbedUpWithABadFileSaysWhere(t *testing.T) {
	spec := filepath.Join(t.TempDir(), "spec.yaml")
	if err := os.WriteFile(spec, []byte("nodes:\n- name: a\n  pod: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e, _, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "up", "--file", spec, "--state-dir", t.TempDir()}); code != 1 {
		t.Fatalf("exit code %d, want 1", code)
	}
	if !strings.Contains(errb.String(), spec) || !strings.Contains(errb.String(), `unknown field "pod"`) {
		t.Errorf("stderr does not name the file and the field:\n%s", errb)
	}
}
