package prombin

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFindSaysHowToBuildWhenTheCacheIsEmpty: with nothing built, Find
// fails with ErrMissing and the error names the make target, so a user
// who runs the test without it knows what to do.
func TestFindSaysHowToBuildWhenTheCacheIsEmpty(t *testing.T) {
	t.Setenv(CacheEnv, t.TempDir())
	_, err := Find(".")
	if !errors.Is(err, ErrMissing) {
		t.Fatalf("Find with an empty cache: %v, want ErrMissing", err)
	}
	if !strings.Contains(err.Error(), "make prometheus-binaries") {
		t.Errorf("Find's error %q does not say how to build", err)
	}
}

// TestCacheKeyFollowsTheModule: a changed go.sum (another Prometheus)
// gives another key, so a stale build is never found.
func TestCacheKeyFollowsTheModule(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("go.mod", "module m\n")
	write("go.sum", "a v1 h1:x\n")
	k1, err := CacheKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	write("go.sum", "a v2 h1:y\n")
	k2, err := CacheKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k1 == k2 || len(k1) != 16 {
		t.Errorf("keys %q and %q: want two different 16-digit keys", k1, k2)
	}
}
