package kubebin

import (
	"os"
	"path/filepath"
	"testing"
)

// TestCacheFolderOfAFixedModuleIsPinned: the cache folder of a fixed tools
// module is a constant, so a change to how it is computed, which would
// make every machine and CI cache build anew, fails here.
func TestCacheFolderOfAFixedModuleIsPinned(t *testing.T) {
	root := t.TempDir()
	tools := filepath.Join(root, ToolsModule)
	if err := os.MkdirAll(tools, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		filepath.Join(root, "go.mod"):  "module github.com/mantlet/mantlet\n",
		filepath.Join(tools, "go.mod"): "module example.com/tools\n\ngo 1.26.0\n\nrequire example.com/prog v1.2.3\n",
		filepath.Join(tools, "go.sum"): "example.com/prog v1.2.3 h1:pinned=\nexample.com/prog v1.2.3/go.mod h1:pinned=\n",
	} {
		if err := os.WriteFile(name, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv(CacheEnv, "/cache")
	b, err := locate(root)
	if want := "/cache/kube-58fdcec4ba646814"; err != nil || b.Dir != want {
		t.Errorf("cache folder %q, %v; want %q", b.Dir, err, want)
	}
}
