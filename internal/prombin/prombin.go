// Package prombin builds and finds the Prometheus server that the
// real-cluster tests (internal/kubecluster) run: Debian's prometheus
// package is built without Kubernetes service discovery, so it is built
// from the nested module test/prometheus/tools, with only that discovery
// mechanism, into a cache folder keyed by that module's go.mod and go.sum
// and the build tags, the way internal/peerbench/peerbin builds
// ghostunnel. It depends on nothing but the standard library and kubebin,
// so that the command that builds it compiles in a moment.
package prombin

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

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
)

// ToolsModule is the nested module that pins Prometheus, relative to the
// repository's root.
const ToolsModule = "test/prometheus/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default kubebin.DefaultCacheRoot as root, the user's cache directory
// otherwise).
const CacheEnv = "MANTLET_PROMETHEUS_CACHE"

// prometheusModule is Prometheus's module, and mainPackage its server.
const (
	prometheusModule = "github.com/prometheus/prometheus"
	mainPackage      = prometheusModule + "/cmd/prometheus"
)

// Tags are the build tags: of all service discovery mechanisms, only
// Kubernetes's (static and file discovery are always there).
const Tags = "remove_all_sd,enable_kubernetes_sd"

// ErrMissing means Prometheus is not built for the tools module as it is
// now; `make prometheus-binaries` builds it.
var ErrMissing = errors.New("prometheus is not built")

// BuildInfo is what a build records next to the binary, in build.json.
type BuildInfo struct {
	Prometheus string    `json:"prometheus"`
	Tags       string    `json:"tags"`
	Go         string    `json:"go"`
	Built      time.Time `json:"built"`
	Took       string    `json:"took"`
}

// Prometheus is a Prometheus server built from ToolsModule.
type Prometheus struct {
	// Dir holds it: <cache root>/prometheus-<key>.
	Dir string
	// Path is the program's path.
	Path string
	// Info is its build.json (zero until built).
	Info BuildInfo
}

func inDir(dir string) Prometheus {
	return Prometheus{Dir: dir, Path: filepath.Join(dir, "prometheus")}
}

// present reports whether the program is there, and reads build.json.
func (p *Prometheus) present() bool {
	fi, err := os.Stat(p.Path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0 {
		return false
	}
	if b, err := os.ReadFile(filepath.Join(p.Dir, "build.json")); err == nil {
		_ = json.Unmarshal(b, &p.Info)
	}
	return true
}

// CacheRoot returns the directory that holds the builds:
// $MANTLET_PROMETHEUS_CACHE if set, kubebin.DefaultCacheRoot as root, else
// <user cache dir>/mantlet.
func CacheRoot() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return filepath.Abs(d)
	}
	if os.Geteuid() == 0 {
		return kubebin.DefaultCacheRoot, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("prombin: no cache directory (set %s): %w", CacheEnv, err)
	}
	return filepath.Join(d, "mantlet"), nil
}

// CacheKey returns the key of the build of the tools module in dir: the
// first 16 hex digits of the SHA-256 of its go.mod, go.sum and the build
// tags.
func CacheKey(dir string) (string, error) {
	h := sha256.New()
	for _, name := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "", fmt.Errorf("prombin: cache key of %s: %w", dir, err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(b))
		h.Write(b)
	}
	fmt.Fprintf(h, "tags %s\n", Tags)
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// locate returns where the build for the repository at root goes.
func locate(root string) (Prometheus, error) {
	key, err := CacheKey(filepath.Join(root, ToolsModule))
	if err != nil {
		return Prometheus{}, err
	}
	cache, err := CacheRoot()
	if err != nil {
		return Prometheus{}, err
	}
	return inDir(filepath.Join(cache, "prometheus-"+key)), nil
}

// Find returns the Prometheus built for the mantlet repository that holds
// dir. If it is not built, the error wraps ErrMissing and says how to
// build it.
func Find(dir string) (Prometheus, error) {
	root, err := kubebin.RepoRoot(dir)
	if err != nil {
		return Prometheus{}, err
	}
	p, err := locate(root)
	if err != nil {
		return Prometheus{}, err
	}
	if !p.present() {
		return Prometheus{}, fmt.Errorf("prombin: %w in %s: run 'make prometheus-binaries' (a few minutes the first time, then cached; %s moves the cache)", ErrMissing, p.Dir, CacheEnv)
	}
	return p, nil
}

// Build builds Prometheus from the tools module of the repository at root
// into the cache, unless it is there already (then built is false). It
// needs the go command. It builds into a temporary folder next to the
// final one and renames it, so a cancelled or failed build leaves nothing
// that looks built.
func Build(ctx context.Context, root string, log *slog.Logger) (p Prometheus, built bool, err error) {
	p, err = locate(root)
	if err != nil {
		return p, false, err
	}
	if p.present() {
		log.Info("prometheus is built already", "dir", p.Dir)
		return p, false, nil
	}
	if _, err := exec.LookPath("go"); err != nil {
		return p, false, fmt.Errorf("prombin: build prometheus: no go command in PATH: %w", err)
	}
	start := time.Now()
	tools := filepath.Join(root, ToolsModule)
	cache := filepath.Dir(p.Dir)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return p, false, fmt.Errorf("prombin: create the cache %s: %w", cache, err)
	}
	tmp, err := os.MkdirTemp(cache, filepath.Base(p.Dir)+".building-")
	if err != nil {
		return p, false, fmt.Errorf("prombin: build folder: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after the rename
	info := BuildInfo{Go: runtime.Version(), Tags: Tags}
	if info.Prometheus, err = moduleVersion(ctx, tools, prometheusModule); err != nil {
		return p, false, err
	}
	log.Info("building prometheus (a few minutes on 2 cores with empty Go caches)", "version", info.Prometheus, "tags", Tags, "into", p.Dir)
	// Without the web UI's assets (the builtinassets tag): the tests use
	// the HTTP API only. -s -w: no symbols, as release builds.
	args := []string{"build", "-trimpath", "-tags", Tags, "-ldflags=-s -w", "-o", filepath.Join(tmp, "prometheus"), mainPackage}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return p, false, fmt.Errorf("prombin: go %s (in %s): %w\n%s", strings.Join(args, " "), tools, err, out)
	}
	took := time.Since(start).Round(time.Second)
	info.Built, info.Took = time.Now().UTC(), took.String()
	j, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return p, false, fmt.Errorf("prombin: encode build.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(j, '\n'), 0o644); err != nil {
		return p, false, fmt.Errorf("prombin: write build.json: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return p, false, fmt.Errorf("prombin: build folder: %w", err)
	}
	if err := os.Rename(tmp, p.Dir); err != nil {
		if p.present() {
			log.Info("another build finished first; using it", "dir", p.Dir)
			return p, false, nil
		}
		return p, false, fmt.Errorf("prombin: move the build into place: %w", err)
	}
	p.present()
	log.Info("built prometheus", "dir", p.Dir, "took", took)
	return p, true, nil
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
		return "", fmt.Errorf("prombin: version of %s in %s: %w", module, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}
