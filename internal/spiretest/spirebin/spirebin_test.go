package spirebin

import (
	"os"
	"path/filepath"
	"testing"
)

// TestCacheKeyFollowsTheToolsModule: the same go.mod and go.sum give the
// same folder; a change to either gives another, so a new SPIRE version is
// built rather than found.
func TestCacheKeyFollowsTheToolsModule(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	key := func() string {
		t.Helper()
		k, err := cacheKey(dir)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	write("go.mod", "module tools\n\nrequire github.com/spiffe/spire v1.13.3\n")
	write("go.sum", "a\n")
	first := key()
	if len(first) != 16 || key() != first {
		t.Fatalf("key %q, then %q: want the same 16 hex digits", first, key())
	}
	write("go.sum", "b\n")
	if key() == first {
		t.Error("a new go.sum kept the key")
	}
	write("go.sum", "a\n")
	write("go.mod", "module tools\n\nrequire github.com/spiffe/spire v1.13.4\n")
	if key() == first {
		t.Error("a new go.mod kept the key")
	}
	if err := os.Remove(filepath.Join(dir, "go.sum")); err != nil {
		t.Fatal(err)
	}
	if _, err := cacheKey(dir); err == nil {
		t.Error("no go.sum: want an error")
	}
}
