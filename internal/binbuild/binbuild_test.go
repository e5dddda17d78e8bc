package binbuild_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/binbuild"
	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/peerbench/peerbin"
	"github.com/mantlet/mantlet/internal/prombin"
	"github.com/mantlet/mantlet/internal/spiretest/spirebin"
)

// The tools module of every fake repository: fixed, so that the keys of
// its builds are constants.
const (
	fixtureGoMod = "module example.com/tools\n\ngo 1.26.0\n\nrequire example.com/prog v1.2.3\n"
	fixtureGoSum = "example.com/prog v1.2.3 h1:pinned=\nexample.com/prog v1.2.3/go.mod h1:pinned=\n"
)

// fakeRepo makes a folder that looks like the repository: the root go.mod
// and the fixture's tools module at each of tools.
func fakeRepo(t *testing.T, tools ...string) string {
	t.Helper()
	root := t.TempDir()
	files := map[string]string{filepath.Join(root, "go.mod"): "module github.com/mantlet/mantlet\n\ngo 1.26.0\n"}
	for _, m := range tools {
		files[filepath.Join(root, m, "go.mod")] = fixtureGoMod
		files[filepath.Join(root, m, "go.sum")] = fixtureGoSum
	}
	for p, s := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// sets are the real program sets.
var sets = []binbuild.Set{kubebin.Set, spirebin.Set, peerbin.Set, prombin.Set}

// TestEverySetKeepsItsCacheFolder: the cache folder of a fixed tools module
// is a constant for every set, the same as before the sets shared this
// package, so a change to how it is computed (which would make every
// machine and CI cache build anew; the Kubernetes programs take 15 minutes)
// fails here.
func TestEverySetKeepsItsCacheFolder(t *testing.T) {
	for _, tc := range []struct {
		set      binbuild.Set
		want     string
		platform string // the key covers it; "" if not
	}{
		{kubebin.Set, "/cache/kube-58fdcec4ba646814", ""},
		{spirebin.Set, "/cache/spire-692df92db1ea3328", "linux/amd64"},
		{peerbin.Set, "/cache/ghostunnel-58fdcec4ba646814", ""},
		{prombin.Set, "/cache/prometheus-b75708e23733d2ce", ""},
	} {
		t.Run(tc.set.Name, func(t *testing.T) {
			if p := runtime.GOOS + "/" + runtime.GOARCH; tc.platform != "" && p != tc.platform {
				t.Skipf("the pinned key is %s's, not %s's", tc.platform, p)
			}
			root := fakeRepo(t, tc.set.Tools)
			t.Setenv(tc.set.CacheEnv, "/cache")
			if got, err := tc.set.Dir(root); err != nil || got != tc.want {
				t.Errorf("cache folder %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// TestEverySetHasItsOwnNameFolderAndCacheVariable: the command line, the
// cache and the environment tell the sets apart.
func TestEverySetHasItsOwnNameFolderAndCacheVariable(t *testing.T) {
	seen := map[string]string{}
	for _, s := range sets {
		for field, v := range map[string]string{"name": s.Name, "folder": s.Prefix, "module": s.Tools, "variable": s.CacheEnv} {
			if v == "" || seen[field+" "+v] != "" {
				t.Errorf("set %q: its %s %q is empty or also %s's", s.Name, field, v, seen[field+" "+v])
			}
			seen[field+" "+v] = s.Name
		}
		if len(s.Programs) == 0 || s.Missing == nil || s.Compile == nil {
			t.Errorf("set %q lacks programs, its missing error or its compile function", s.Name)
		}
	}
}

func TestRepoRootIsFoundFromAnyFolderInside(t *testing.T) {
	root := fakeRepo(t, "test/x/tools")
	for _, dir := range []string{root, filepath.Join(root, "test/x/tools")} {
		if got, err := binbuild.RepoRoot(dir); err != nil || got != root {
			t.Errorf("RepoRoot(%s) = %q, %v; want %q", dir, got, err, root)
		}
	}
	if _, err := binbuild.RepoRoot(t.TempDir()); err == nil {
		t.Error("RepoRoot outside the repository found one")
	}
}

func TestModuleKeyFollowsGoModGoSumAndWhatElseTheBuildDependsOn(t *testing.T) {
	dir := filepath.Join(fakeRepo(t, "tools"), "tools")
	key := func(extra ...string) string {
		t.Helper()
		k, err := binbuild.ModuleKey(dir, extra...)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	first := key()
	if len(first) != 16 || key() != first {
		t.Fatalf("keys %q, %q: want the same 16 hex digits twice", first, key())
	}
	seen := map[string]string{first: "as made"}
	note := func(k, what string) {
		t.Helper()
		if prev, ok := seen[k]; ok {
			t.Errorf("%s left the key %s as it was %s", what, k, prev)
		}
		seen[k] = what
	}
	note(key("tags a\n"), "a build tag")
	for _, name := range []string{"go.sum", "go.mod"} {
		f := filepath.Join(dir, name)
		b, _ := os.ReadFile(f)
		if err := os.WriteFile(f, append(b, "// changed\n"...), 0o644); err != nil {
			t.Fatal(err)
		}
		note(key(), "changing "+name)
	}
	if err := os.Remove(filepath.Join(dir, "go.sum")); err != nil {
		t.Fatal(err)
	}
	if _, err := binbuild.ModuleKey(dir); err == nil {
		t.Error("no go.sum: want an error")
	}
}

func TestTheCacheIsTheVariablesOrRootsOrTheUsers(t *testing.T) {
	s := binbuild.Set{Name: "x", CacheEnv: "MANTLET_TEST_CACHE"}
	t.Setenv(s.CacheEnv, "/somewhere/else")
	if got, err := s.CacheRoot(); err != nil || got != "/somewhere/else" {
		t.Errorf("with $%s: %q, %v", s.CacheEnv, got, err)
	}
	t.Setenv(s.CacheEnv, "")
	want := binbuild.DefaultCacheRoot
	if os.Geteuid() != 0 {
		d, err := os.UserCacheDir()
		if err != nil {
			t.Skipf("no user cache directory: %v", err)
		}
		want = filepath.Join(d, "mantlet")
	}
	if got, err := s.CacheRoot(); err != nil || got != want {
		t.Errorf("without $%s: %q, %v; want %q", s.CacheEnv, got, err, want)
	}
}

// TestAMissingSetSaysHowToBuildIt: with nothing built, Find fails with
// the set's missing error, and the error names the make target and the
// variable that moves the cache, so a user who runs a test without them
// knows what to do.
func TestAMissingSetSaysHowToBuildIt(t *testing.T) {
	for _, s := range sets {
		t.Run(s.Name, func(t *testing.T) {
			root := fakeRepo(t, s.Tools)
			t.Setenv(s.CacheEnv, t.TempDir())
			_, err := s.Find(filepath.Join(root, s.Tools))
			if !errors.Is(err, s.Missing) {
				t.Fatalf("Find with an empty cache: %v, want %v", err, s.Missing)
			}
			for _, want := range []string{"make " + s.Name + "-binaries", s.CacheEnv} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Find's error %q does not say %q", err, want)
				}
			}
		})
	}
}

// fakeSet is a set of one program, "prog", that compile writes (a shell
// script) unless it is told to fail.
func fakeSet(compiled *int, fail error) binbuild.Set {
	return binbuild.Set{
		Name: "fake", Tools: "test/fake/tools", Prefix: "fake", CacheEnv: "MANTLET_FAKE_CACHE",
		Programs: []string{"prog"}, Missing: errors.New("prog is not built"), FirstBuild: "no time",
		Compile: func(ctx context.Context, tools, dir string, log *slog.Logger) (binbuild.Record, error) {
			*compiled++
			if fail != nil {
				return nil, fail
			}
			if err := os.WriteFile(filepath.Join(dir, "prog"), []byte("#!/bin/sh\n"), 0o755); err != nil {
				return nil, err
			}
			return &fakeRecord{Version: "v1.2.3"}, nil
		},
	}
}

type fakeRecord struct {
	Version string `json:"version"`
	binbuild.Stamp
}

func TestABuildIsFoundThenAndNotBuiltAgain(t *testing.T) {
	var compiled int
	s := fakeSet(&compiled, nil)
	root := fakeRepo(t, s.Tools)
	t.Setenv(s.CacheEnv, t.TempDir())
	log := slog.New(slog.DiscardHandler)
	p, built, err := binbuild.BuildProgram[fakeRecord](context.Background(), s, root, log)
	if err != nil || !built || p.Path != filepath.Join(p.Dir, "prog") {
		t.Fatalf("first Build: %+v, built %v, %v; want prog built", p, built, err)
	}
	if p.Info.Version != "v1.2.3" || p.Info.Go != runtime.Version() || p.Info.Built.IsZero() || p.Info.Took == "" {
		t.Errorf("build.json records %+v; want the set's version and the stamp", p.Info)
	}
	if got, err := binbuild.FindProgram[fakeRecord](s, root); err != nil || got != p {
		t.Errorf("Find after the build: %+v, %v; want %+v", got, err, p)
	}
	if again, built, err := s.Build(context.Background(), root, log); err != nil || built || again != p.Dir {
		t.Errorf("second Build: %q, built %v, %v; want %q, not built", again, built, err, p.Dir)
	}
	if compiled != 1 {
		t.Errorf("compiled %d times; want once", compiled)
	}
}

func TestAFailedBuildLeavesNothingThatLooksBuilt(t *testing.T) {
	var compiled int
	boom := errors.New("boom")
	s := fakeSet(&compiled, boom)
	root := fakeRepo(t, s.Tools)
	cache := t.TempDir()
	t.Setenv(s.CacheEnv, cache)
	if _, built, err := s.Build(context.Background(), root, slog.New(slog.DiscardHandler)); !errors.Is(err, boom) || built {
		t.Fatalf("Build: built %v, %v; want %v", built, err, boom)
	}
	if left, _ := os.ReadDir(cache); len(left) != 0 {
		t.Errorf("the cache holds %v after a failed build; want nothing", left)
	}
	if _, err := s.Find(root); !errors.Is(err, s.Missing) {
		t.Errorf("Find after a failed build: %v; want %v", err, s.Missing)
	}
}

// TestBuildJSONKeepsItsFields: a set's record and the stamp share one
// flat object, as build.json always had it.
func TestBuildJSONKeepsItsFields(t *testing.T) {
	b, err := json.Marshal(peerbin.BuildInfo{Ghostunnel: "v1.8.4", Stamp: binbuild.Stamp{Go: "go1.26.0", Took: "1s"}})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ghostunnel", "go", "built", "took"} {
		if _, ok := m[k]; !ok {
			t.Errorf("build.json %s lacks %q", b, k)
		}
	}
}
