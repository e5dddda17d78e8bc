// Package kubebin builds and finds the Kubernetes programs that the tests
// run: kube-apiserver and etcd (internal/kubetest), and kubelet,
// kube-proxy, kube-controller-manager, kube-scheduler and kubectl (the
// real-node cluster, internal/kubecluster). It describes them as a
// binbuild.Set: built from the nested module test/kube/tools into a cache
// folder keyed by that module's go.mod and go.sum.
package kubebin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/mantlet/mantlet/internal/binbuild"
)

// ToolsModule is the nested module that pins the programs, relative to the
// repository's root.
const ToolsModule = "test/kube/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default binbuild.DefaultCacheRoot as root, the user's cache directory
// otherwise).
const CacheEnv = "MANTLET_KUBE_CACHE"

// The programs, as the tools module names them. go build names each after
// the last element of its path, except etcd's ("server", renamed).
const (
	apiServerPackage = "k8s.io/kubernetes/cmd/kube-apiserver"
	etcdPackage      = "go.etcd.io/etcd/server/v3"
)

// nodePackages are the programs of a real cluster's nodes and controllers,
// and kubectl.
var nodePackages = []string{
	"k8s.io/kubernetes/cmd/kubelet",
	"k8s.io/kubernetes/cmd/kube-proxy",
	"k8s.io/kubernetes/cmd/kube-controller-manager",
	"k8s.io/kubernetes/cmd/kube-scheduler",
	"k8s.io/kubernetes/cmd/kubectl",
}

// ErrMissing means the programs are not built for the tools module as it
// is now; `make kube-binaries` builds them.
var ErrMissing = errors.New("the Kubernetes programs are not built")

// Set is the Kubernetes programs: <cache root>/kube-<key>, where the key
// is binbuild.ModuleKey's.
var Set = binbuild.Set{
	Name:       "kube",
	Tools:      ToolsModule,
	Prefix:     "kube",
	CacheEnv:   CacheEnv,
	Programs:   []string{"kube-apiserver", "etcd", "kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "kubectl"},
	Missing:    ErrMissing,
	FirstBuild: "10 to 20 minutes on 2 cores the first time",
	Compile:    compile,
}

// Binaries are the programs built from ToolsModule.
type Binaries struct {
	// Dir holds them: <cache root>/kube-<key>.
	Dir string
	// APIServer and Etcd are the programs' paths.
	APIServer, Etcd string
	// Kubelet, KubeProxy, ControllerManager, Scheduler and Kubectl are the
	// rest of a cluster's programs.
	Kubelet, KubeProxy, ControllerManager, Scheduler, Kubectl string
}

// binariesIn names the programs in dir.
func binariesIn(dir string) Binaries {
	f := func(name string) string { return filepath.Join(dir, name) }
	return Binaries{
		Dir:               dir,
		APIServer:         f("kube-apiserver"),
		Etcd:              f("etcd"),
		Kubelet:           f("kubelet"),
		KubeProxy:         f("kube-proxy"),
		ControllerManager: f("kube-controller-manager"),
		Scheduler:         f("kube-scheduler"),
		Kubectl:           f("kubectl"),
	}
}

// RepoRoot returns the root of the mantlet repository that holds dir:
// binbuild.RepoRoot, here for the harnesses that already import kubebin.
func RepoRoot(dir string) (string, error) { return binbuild.RepoRoot(dir) }

// Find returns the binaries built for the repository that holds the
// working directory (go test runs a package's tests in its folder). If they
// are not built, the error wraps ErrMissing and says how to build them.
func Find() (Binaries, error) {
	dir, err := Set.Find(".")
	if err != nil {
		return Binaries{}, err
	}
	return binariesIn(dir), nil
}

// Build builds the programs from the tools module of the repository at
// root into the cache, unless they are there already (then built is
// false); see binbuild.Set.Build.
func Build(ctx context.Context, root string, log *slog.Logger) (Binaries, bool, error) {
	dir, built, err := Set.Build(ctx, root, log)
	return binariesIn(dir), built, err
}

// BuildInfo is what a build records next to the binaries, in build.json.
type BuildInfo struct {
	Kubernetes string `json:"kubernetes"`
	Etcd       string `json:"etcd"`
	binbuild.Stamp
}

// compile builds every program into dir, in one go build (so that the
// packages they share compile once), statically (no cgo, as Kubernetes
// releases them), stripped, with the version stamped the way Kubernetes's
// own build does, so that the API server reports it at /version.
func compile(ctx context.Context, tools, dir string, log *slog.Logger) (binbuild.Record, error) {
	var info BuildInfo
	var err error
	if info.Kubernetes, err = binbuild.ModuleVersion(ctx, tools, "k8s.io/kubernetes"); err != nil {
		return nil, err
	}
	if info.Etcd, err = binbuild.ModuleVersion(ctx, tools, "go.etcd.io/etcd/server/v3"); err != nil {
		return nil, err
	}
	log.Info("building kube-apiserver, etcd, kubelet, kube-proxy, kube-controller-manager, kube-scheduler and kubectl (10 to 20 minutes on 2 cores with empty Go caches)",
		"kubernetes", info.Kubernetes, "etcd", info.Etcd)
	major, minor, _ := strings.Cut(strings.TrimPrefix(info.Kubernetes, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	// -s -w: no symbol table or DWARF, as Kubernetes releases them.
	ldflags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		ldflags = append(ldflags,
			"-X", pkg+".gitVersion="+info.Kubernetes,
			"-X", pkg+".gitMajor="+major,
			"-X", pkg+".gitMinor="+minor,
			"-X", pkg+".gitTreeState=clean")
	}
	args := append([]string{"-trimpath", "-ldflags=" + strings.Join(ldflags, " "), "-o", dir + string(filepath.Separator), apiServerPackage, etcdPackage}, nodePackages...)
	if err := binbuild.GoBuild(ctx, tools, []string{"CGO_ENABLED=0"}, os.Stderr, args...); err != nil {
		return nil, err
	}
	// go build names etcd's program after its module path without the
	// major version: "server".
	if err := os.Rename(filepath.Join(dir, "server"), filepath.Join(dir, "etcd")); err != nil {
		return nil, fmt.Errorf("kubebin: name the etcd binary: %w", err)
	}
	return &info, nil
}
