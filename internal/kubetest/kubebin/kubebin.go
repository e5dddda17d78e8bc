// Package kubebin builds and finds the Kubernetes programs that the tests
// run: kube-apiserver and etcd (internal/kubetest), and kubelet,
// kube-proxy, kube-controller-manager, kube-scheduler and kubectl (the
// real-node cluster, internal/kubecluster). It builds them from the nested
// module test/kube/tools into a cache folder keyed by that module's go.mod
// and go.sum, and finds them there. It depends on nothing but the standard
// library, so that the command that builds them (cmd/kube-binaries)
// compiles in a moment.
package kubebin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// ToolsModule is the nested module that pins the programs, relative to the
// repository's root.
const ToolsModule = "test/kube/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default DefaultCacheRoot as root, the user's cache directory otherwise).
const CacheEnv = "MANTLET_KUBE_CACHE"

// DefaultCacheRoot is where root keeps the binaries.
const DefaultCacheRoot = "/var/cache/mantlet"

// rootModule is the module path that marks the repository's root.
const rootModule = "github.com/mantlet/mantlet"

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

// all lists every program's path.
func (b Binaries) all() []string {
	return []string{b.APIServer, b.Etcd, b.Kubelet, b.KubeProxy, b.ControllerManager, b.Scheduler, b.Kubectl}
}

// present reports whether every program is there.
func (b Binaries) present() bool {
	for _, p := range b.all() {
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0 {
			return false
		}
	}
	return true
}

// CacheRoot returns the directory that holds the builds: $MANTLET_KUBE_CACHE
// if set, DefaultCacheRoot as root, else <user cache dir>/mantlet.
func CacheRoot() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return filepath.Abs(d)
	}
	if os.Geteuid() == 0 {
		return DefaultCacheRoot, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("kubebin: no cache directory (set %s): %w", CacheEnv, err)
	}
	return filepath.Join(d, "mantlet"), nil
}

// RepoRoot returns the root of the mantlet repository that holds dir (or
// one of dir's parents): the folder whose go.mod declares the module
// github.com/mantlet/mantlet.
func RepoRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("kubebin: find the repository: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && modulePath(b) == rootModule {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("kubebin: no go.mod of %s in %s or above", rootModule, dir)
		}
	}
}

// modulePath returns the path a go.mod file declares.
func modulePath(gomod []byte) string {
	for line := range strings.Lines(string(gomod)) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

// CacheKey returns the key of the build of the tools module in dir: the
// first 16 hex digits of the SHA-256 of its go.mod and go.sum. go.sum pins
// every module that goes into the programs; go.mod adds the replace lines
// and the tools to build, which go.sum does not show.
func CacheKey(dir string) (string, error) {
	h := sha256.New()
	for _, name := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "", fmt.Errorf("kubebin: cache key of %s: %w", dir, err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// locate returns where the binaries of the repository at root go, built or
// not.
func locate(root string) (Binaries, error) {
	key, err := CacheKey(filepath.Join(root, ToolsModule))
	if err != nil {
		return Binaries{}, err
	}
	cache, err := CacheRoot()
	if err != nil {
		return Binaries{}, err
	}
	return binariesIn(filepath.Join(cache, "kube-"+key)), nil
}

// Find returns the binaries built for the repository that holds the
// working directory (go test runs a package's tests in its folder). If they
// are not built, the error wraps ErrMissing and says how to build them.
func Find() (Binaries, error) {
	wd, err := os.Getwd()
	if err != nil {
		return Binaries{}, fmt.Errorf("kubebin: working directory: %w", err)
	}
	root, err := RepoRoot(wd)
	if err != nil {
		return Binaries{}, err
	}
	b, err := locate(root)
	if err != nil {
		return Binaries{}, err
	}
	if !b.present() {
		return Binaries{}, fmt.Errorf("kubebin: %w in %s: run 'make kube-binaries' (10 to 20 minutes on 2 cores the first time, then cached; %s moves the cache)", ErrMissing, b.Dir, CacheEnv)
	}
	return b, nil
}

// BuildInfo is what a build records next to the binaries, in build.json.
type BuildInfo struct {
	Kubernetes string    `json:"kubernetes"`
	Etcd       string    `json:"etcd"`
	Go         string    `json:"go"`
	Built      time.Time `json:"built"`
	Took       string    `json:"took"`
}

// Build builds kube-apiserver and etcd from the tools module of the
// repository at root into the cache, unless they are there already (then
// built is false). It builds into a temporary folder next to the final one
// and renames it, so that a cancelled or failed build leaves nothing that
// looks built.
func Build(ctx context.Context, root string, log *slog.Logger) (b Binaries, built bool, err error) {
	b, err = locate(root)
	if err != nil {
		return b, false, err
	}
	if b.present() {
		log.Info("the Kubernetes programs are built already", "dir", b.Dir)
		return b, false, nil
	}
	start := time.Now()
	tools := filepath.Join(root, ToolsModule)
	cache := filepath.Dir(b.Dir)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return b, false, fmt.Errorf("kubebin: create the cache %s: %w", cache, err)
	}
	tmp, err := os.MkdirTemp(cache, filepath.Base(b.Dir)+".building-")
	if err != nil {
		return b, false, fmt.Errorf("kubebin: build folder: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after the rename
	info := BuildInfo{Go: runtime.Version()}
	if info.Kubernetes, err = moduleVersion(ctx, tools, "k8s.io/kubernetes"); err != nil {
		return b, false, err
	}
	if info.Etcd, err = moduleVersion(ctx, tools, "go.etcd.io/etcd/server/v3"); err != nil {
		return b, false, err
	}
	log.Info("building kube-apiserver, etcd, kubelet, kube-proxy, kube-controller-manager, kube-scheduler and kubectl (10 to 20 minutes on 2 cores with empty Go caches)",
		"kubernetes", info.Kubernetes, "etcd", info.Etcd, "into", b.Dir)
	if err := goBuild(ctx, tools, tmp, info.Kubernetes); err != nil {
		return b, false, err
	}
	// go build names etcd's program after its module path without the
	// major version: "server".
	if err := os.Rename(filepath.Join(tmp, "server"), filepath.Join(tmp, "etcd")); err != nil {
		return b, false, fmt.Errorf("kubebin: name the etcd binary: %w", err)
	}
	took := time.Since(start).Round(time.Second)
	info.Built, info.Took = time.Now().UTC(), took.String()
	j, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return b, false, fmt.Errorf("kubebin: encode build.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(j, '\n'), 0o644); err != nil {
		return b, false, fmt.Errorf("kubebin: write build.json: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return b, false, fmt.Errorf("kubebin: build folder: %w", err)
	}
	if err := os.Rename(tmp, b.Dir); err != nil {
		if b.present() {
			log.Info("another build finished first; using it", "dir", b.Dir)
			return b, false, nil
		}
		return b, false, fmt.Errorf("kubebin: move the build into place: %w", err)
	}
	log.Info("built the Kubernetes programs", "dir", b.Dir, "took", took)
	return b, true, nil
}

// moduleVersion asks the go command which version of module the tools
// module uses.
func moduleVersion(ctx context.Context, tools, module string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", module)
	cmd.Dir = tools
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return "", fmt.Errorf("kubebin: version of %s in %s: %w", module, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// goBuild builds every program into dir, in one go build (so that the
// packages they share compile once), statically (no cgo, as Kubernetes
// releases them), stripped, with the version stamped the way Kubernetes's own build
// does, so that the API server reports it at /version.
func goBuild(ctx context.Context, tools, dir, version string) error {
	major, minor, _ := strings.Cut(strings.TrimPrefix(version, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	// -s -w: no symbol table or DWARF, as Kubernetes releases them.
	ldflags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		ldflags = append(ldflags,
			"-X", pkg+".gitVersion="+version,
			"-X", pkg+".gitMajor="+major,
			"-X", pkg+".gitMinor="+minor,
			"-X", pkg+".gitTreeState=clean")
	}
	args := []string{"build", "-trimpath", "-ldflags=" + strings.Join(ldflags, " "), "-o", dir + string(filepath.Separator), apiServerPackage, etcdPackage}
	args = append(args, nodePackages...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("kubebin: go %s (in %s): %w", strings.Join(args, " "), tools, err)
	}
	return nil
}
