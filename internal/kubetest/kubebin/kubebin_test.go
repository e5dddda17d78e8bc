package kubebin

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

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

// TestBinariesAreTheSetsPrograms: the paths Find and Build return are the
// programs the set builds and checks for.
func TestBinariesAreTheSetsPrograms(t *testing.T) {
	b := binariesIn("/d")
	got := []string{b.APIServer, b.Etcd, b.Kubelet, b.KubeProxy, b.ControllerManager, b.Scheduler, b.Kubectl}
	var want []string
	for _, p := range Set.Programs {
		want = append(want, filepath.Join("/d", p))
	}
	if !slices.Equal(got, want) {
		t.Errorf("Binaries %v; want the set's programs %v", got, want)
	}
}
