// Package peerbin builds and finds the ghostunnel that the peer benchmark
// (internal/peerbench) runs as a sidecar-style mutual TLS pair: it builds
// it from the nested module test/bench/tools into a cache folder keyed by
// that module's go.mod and go.sum, the way internal/kubetest/kubebin
// builds the API server. It depends on nothing but the standard library
// and kubebin, so that the command that builds it compiles in a moment.
package peerbin

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

// ToolsModule is the nested module that pins ghostunnel, relative to the
// repository's root.
const ToolsModule = "test/bench/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default kubebin.DefaultCacheRoot as root, the user's cache directory
// otherwise).
const CacheEnv = "MANTLET_PEER_CACHE"

// ghostunnelModule is the module (and main package) of ghostunnel.
const ghostunnelModule = "github.com/ghostunnel/ghostunnel"

// ErrMissing means ghostunnel is not built for the tools module as it is
// now; `make peer-binaries` builds it.
var ErrMissing = errors.New("ghostunnel is not built")

// BuildInfo is what a build records next to the binary, in build.json.
type BuildInfo struct {
	Ghostunnel string    `json:"ghostunnel"`
	Go         string    `json:"go"`
	Built      time.Time `json:"built"`
	Took       string    `json:"took"`
}

// Ghostunnel is a ghostunnel built from ToolsModule.
type Ghostunnel struct {
	// Dir holds it: <cache root>/ghostunnel-<key>.
	Dir string
	// Path is the program's path.
	Path string
	// Info is its build.json (zero until built).
	Info BuildInfo
}

func inDir(dir string) Ghostunnel {
	return Ghostunnel{Dir: dir, Path: filepath.Join(dir, "ghostunnel")}
}

// present reports whether the program is there, and reads build.json.
func (g *Ghostunnel) present() bool {
	fi, err := os.Stat(g.Path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0 {
		return false
	}
	if b, err := os.ReadFile(filepath.Join(g.Dir, "build.json")); err == nil {
		_ = json.Unmarshal(b, &g.Info)
	}
	return true
}

// CacheRoot returns the directory that holds the builds: $MANTLET_PEER_CACHE
// if set, kubebin.DefaultCacheRoot as root, else <user cache dir>/mantlet.
func CacheRoot() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return filepath.Abs(d)
	}
	if os.Geteuid() == 0 {
		return kubebin.DefaultCacheRoot, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("peerbin: no cache directory (set %s): %w", CacheEnv, err)
	}
	return filepath.Join(d, "mantlet"), nil
}

// CacheKey returns the key of the build of the tools module in dir: the
// first 16 hex digits of the SHA-256 of its go.mod and go.sum.
func CacheKey(dir string) (string, error) {
	h := sha256.New()
	for _, name := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "", fmt.Errorf("peerbin: cache key of %s: %w", dir, err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// locate returns where the build for the repository at root goes.
func locate(root string) (Ghostunnel, error) {
	key, err := CacheKey(filepath.Join(root, ToolsModule))
	if err != nil {
		return Ghostunnel{}, err
	}
	cache, err := CacheRoot()
	if err != nil {
		return Ghostunnel{}, err
	}
	return inDir(filepath.Join(cache, "ghostunnel-"+key)), nil
}

// Find returns the ghostunnel built for the mantlet repository that holds
// dir. If it is not built, the error wraps ErrMissing and says how to
// build it.
func Find(dir string) (Ghostunnel, error) {
	root, err := kubebin.RepoRoot(dir)
	if err != nil {
		return Ghostunnel{}, err
	}
	g, err := locate(root)
	if err != nil {
		return Ghostunnel{}, err
	}
	if !g.present() {
		return Ghostunnel{}, fmt.Errorf("peerbin: %w in %s: run 'make peer-binaries' (a few minutes the first time, then cached; %s moves the cache)", ErrMissing, g.Dir, CacheEnv)
	}
	return g, nil
}

// Build builds ghostunnel from the tools module of the repository at root
// into the cache, unless it is there already (then built is false). It
// needs the go command. It builds into a temporary folder next to the
// final one and renames it, so a cancelled or failed build leaves nothing
// that looks built.
func Build(ctx context.Context, root string, log *slog.Logger) (g Ghostunnel, built bool, err error) {
	g, err = locate(root)
	if err != nil {
		return g, false, err
	}
	if g.present() {
		log.Info("ghostunnel is built already", "dir", g.Dir)
		return g, false, nil
	}
	if _, err := exec.LookPath("go"); err != nil {
		return g, false, fmt.Errorf("peerbin: build ghostunnel: no go command in PATH: %w", err)
	}
	start := time.Now()
	tools := filepath.Join(root, ToolsModule)
	cache := filepath.Dir(g.Dir)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return g, false, fmt.Errorf("peerbin: create the cache %s: %w", cache, err)
	}
	tmp, err := os.MkdirTemp(cache, filepath.Base(g.Dir)+".building-")
	if err != nil {
		return g, false, fmt.Errorf("peerbin: build folder: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after the rename
	info := BuildInfo{Go: runtime.Version()}
	if info.Ghostunnel, err = moduleVersion(ctx, tools, ghostunnelModule); err != nil {
		return g, false, err
	}
	log.Info("building ghostunnel (2 to 3 minutes on 2 cores with empty Go caches)", "version", info.Ghostunnel, "into", g.Dir)
	// With cgo (and so a C compiler): v1.8.4's stub for builds without
	// PKCS#11 support (no cgo, or the nopkcs11 tag) does not compile.
	// -s -w: no symbols, as release builds.
	args := []string{"build", "-trimpath", "-ldflags=-s -w -X main.version=" + info.Ghostunnel, "-o", filepath.Join(tmp, "ghostunnel"), ghostunnelModule}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return g, false, fmt.Errorf("peerbin: go %s (in %s): %w\n%s", strings.Join(args, " "), tools, err, out)
	}
	took := time.Since(start).Round(time.Second)
	info.Built, info.Took = time.Now().UTC(), took.String()
	j, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return g, false, fmt.Errorf("peerbin: encode build.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(j, '\n'), 0o644); err != nil {
		return g, false, fmt.Errorf("peerbin: write build.json: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return g, false, fmt.Errorf("peerbin: build folder: %w", err)
	}
	if err := os.Rename(tmp, g.Dir); err != nil {
		if g.present() {
			log.Info("another build finished first; using it", "dir", g.Dir)
			return g, false, nil
		}
		return g, false, fmt.Errorf("peerbin: move the build into place: %w", err)
	}
	g.present()
	log.Info("built ghostunnel", "dir", g.Dir, "took", took)
	return g, true, nil
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
		return "", fmt.Errorf("peerbin: version of %s in %s: %w", module, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}
