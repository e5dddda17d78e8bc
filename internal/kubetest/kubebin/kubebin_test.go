package kubebin

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeRepo makes a folder that looks like the repository: the root go.mod
// and a tools module.
func fakeRepo(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	tools := filepath.Join(root, ToolsModule)
	if err := os.MkdirAll(tools, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		filepath.Join(root, "go.mod"):  "module github.com/mantlet/mantlet\n\ngo 1.26.0\n",
		filepath.Join(tools, "go.mod"): "module example.com/tools\n",
		filepath.Join(tools, "go.sum"): "k8s.io/kubernetes v1.37.2 h1:x=\n",
	}
	for p, s := range files {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestRepoRootIsFoundFromAnyFolderInside(t *testing.T) {
	root := fakeRepo(t)
	for _, dir := range []string{root, filepath.Join(root, ToolsModule)} {
		got, err := RepoRoot(dir)
		if err != nil || got != root {
			t.Errorf("RepoRoot(%s) = %q, %v; want %q", dir, got, err, root)
		}
	}
	if _, err := RepoRoot(t.TempDir()); err == nil {
		t.Error("RepoRoot outside the repository found one")
	}
}

func TestTheRealRepositoryPinsKubernetesInItsToolsModule(t *testing.T) {
	root, err := RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, ToolsModule, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range append([]string{"\tk8s.io/kubernetes v1.37.2", "\tk8s.io/client-go => k8s.io/client-go v0.37.2\n", apiServerPackage, etcdPackage}, nodePackages...) {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s/go.mod lacks %q", ToolsModule, want)
		}
	}
	// The root module must not depend on Kubernetes itself.
	if rb, err := os.ReadFile(filepath.Join(root, "go.mod")); err != nil || strings.Contains(string(rb), "k8s.io/kubernetes") {
		t.Errorf("the root go.mod names k8s.io/kubernetes (or is unreadable: %v)", err)
	}
}

func TestCacheKeyFollowsGoModAndGoSum(t *testing.T) {
	root := fakeRepo(t)
	tools := filepath.Join(root, ToolsModule)
	k1, err := CacheKey(tools)
	if err != nil {
		t.Fatal(err)
	}
	if k2, _ := CacheKey(tools); k2 != k1 || len(k1) != 16 {
		t.Fatalf("keys %q, %q: want the same 16 hex digits twice", k1, k2)
	}
	seen := map[string]string{k1: "as made"}
	for _, name := range []string{"go.sum", "go.mod"} {
		f := filepath.Join(tools, name)
		b, _ := os.ReadFile(f)
		if err := os.WriteFile(f, append(b, "// changed\n"...), 0o644); err != nil {
			t.Fatal(err)
		}
		k, err := CacheKey(tools)
		if err != nil {
			t.Fatal(err)
		}
		if prev, ok := seen[k]; ok {
			t.Errorf("changing %s left the key %s as it was %s", name, k, prev)
		}
		seen[k] = name + " changed"
	}
}

func TestMissingBinariesSayHowToBuildThem(t *testing.T) {
	t.Setenv(CacheEnv, t.TempDir())
	_, err := Find()
	if !errors.Is(err, ErrMissing) {
		t.Fatalf("Find with an empty cache: %v, want ErrMissing", err)
	}
	if !strings.Contains(err.Error(), "make kube-binaries") {
		t.Errorf("the error does not say how to build them: %v", err)
	}
}

func TestAWarmCacheIsUsedWithoutBuilding(t *testing.T) {
	root := fakeRepo(t)
	t.Setenv(CacheEnv, t.TempDir())
	want, err := locate(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(want.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range want.all() {
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The fake tools module could not be built: a build attempt fails.
	got, built, err := Build(context.Background(), root, slog.New(slog.DiscardHandler))
	if err != nil || built || got != want {
		t.Errorf("Build with a warm cache = %+v, built %v, %v; want %+v, not built", got, built, err, want)
	}
}
