// Package spirebin builds and finds the spire-server and spire-agent that
// internal/spiretest runs: it builds them from the nested module
// test/spire/tools into a cache folder keyed by that module's go.mod and
// go.sum, and finds them there. Like kubebin, whose repository and key
// helpers it shares, it depends on nothing else, so that the command that
// builds them (cmd/spire-binaries) compiles in a moment.
package spirebin

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

// ToolsModule is the nested module that pins SPIRE, relative to the
// repository's root.
const ToolsModule = "test/spire/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default kubebin.DefaultCacheRoot as root, the user's cache directory
// otherwise).
const CacheEnv = "MANTLET_SPIRE_CACHE"

// The SPIRE module and its two programs.
const (
	spireModule   = "github.com/spiffe/spire"
	serverPackage = spireModule + "/cmd/spire-server"
	agentPackage  = spireModule + "/cmd/spire-agent"
)

// ErrMissing means spire-server and spire-agent are not built for the
// tools module as it is now; `make spire-binaries` builds them.
var ErrMissing = errors.New("spire-server and spire-agent are not built")

// Binaries are a spire-server and a spire-agent built from ToolsModule.
type Binaries struct {
	// Dir holds them: <cache root>/spire-<key> (see cacheKey).
	Dir string
	// Server and Agent are the programs' paths.
	Server, Agent string
}

func binariesIn(dir string) Binaries {
	return Binaries{Dir: dir, Server: filepath.Join(dir, "spire-server"), Agent: filepath.Join(dir, "spire-agent")}
}

// present reports whether both programs are there.
func (b Binaries) present() bool {
	for _, p := range []string{b.Server, b.Agent} {
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0 {
			return false
		}
	}
	return true
}

// CacheRoot returns the directory that holds the builds:
// $MANTLET_SPIRE_CACHE if set, kubebin.DefaultCacheRoot as root, else
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
		return "", fmt.Errorf("spirebin: no cache directory (set %s): %w", CacheEnv, err)
	}
	return filepath.Join(d, "mantlet"), nil
}

// locate returns where the binaries of the repository at root go, built or
// not.
func locate(root string) (Binaries, error) {
	key, err := cacheKey(filepath.Join(root, ToolsModule))
	if err != nil {
		return Binaries{}, err
	}
	cache, err := CacheRoot()
	if err != nil {
		return Binaries{}, err
	}
	return binariesIn(filepath.Join(cache, "spire-"+key)), nil
}

// Find returns the binaries built for the repository that holds the
// working directory. If they are not built, the error wraps ErrMissing and
// says how to build them.
func Find() (Binaries, error) {
	wd, err := os.Getwd()
	if err != nil {
		return Binaries{}, fmt.Errorf("spirebin: working directory: %w", err)
	}
	root, err := kubebin.RepoRoot(wd)
	if err != nil {
		return Binaries{}, err
	}
	b, err := locate(root)
	if err != nil {
		return Binaries{}, err
	}
	if !b.present() {
		return Binaries{}, fmt.Errorf("spirebin: %w in %s: run 'make spire-binaries' (needs gcc; several minutes on 2 cores the first time, then cached; %s moves the cache)", ErrMissing, b.Dir, CacheEnv)
	}
	return b, nil
}

// BuildInfo is what a build records next to the binaries, in build.json.
type BuildInfo struct {
	SPIRE string    `json:"spire"`
	Go    string    `json:"go"`
	CC    string    `json:"cc"`
	Built time.Time `json:"built"`
	Took  string    `json:"took"`
}

// Build builds spire-server and spire-agent from the tools module of the
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
		log.Info("spire-server and spire-agent are built already", "dir", b.Dir)
		return b, false, nil
	}
	start := time.Now()
	tools := filepath.Join(root, ToolsModule)
	info := BuildInfo{Go: runtime.Version()}
	// The server keeps its registrations in SQLite, which needs cgo.
	if info.CC, err = cCompiler(ctx, tools); err != nil {
		return b, false, err
	}
	if info.SPIRE, err = moduleVersion(ctx, tools, spireModule); err != nil {
		return b, false, err
	}
	cache := filepath.Dir(b.Dir)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return b, false, fmt.Errorf("spirebin: create the cache %s: %w", cache, err)
	}
	tmp, err := os.MkdirTemp(cache, filepath.Base(b.Dir)+".building-")
	if err != nil {
		return b, false, fmt.Errorf("spirebin: build folder: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after the rename
	log.Info("building spire-server and spire-agent (cgo, for SQLite; several minutes on 2 cores with empty Go caches)",
		"spire", info.SPIRE, "cc", info.CC, "into", b.Dir)
	if err := goBuild(ctx, tools, tmp, info.SPIRE); err != nil {
		return b, false, err
	}
	took := time.Since(start).Round(time.Second)
	info.Built, info.Took = time.Now().UTC(), took.String()
	j, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return b, false, fmt.Errorf("spirebin: encode build.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(j, '\n'), 0o644); err != nil {
		return b, false, fmt.Errorf("spirebin: write build.json: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return b, false, fmt.Errorf("spirebin: build folder: %w", err)
	}
	if err := os.Rename(tmp, b.Dir); err != nil {
		if b.present() {
			log.Info("another build finished first; using it", "dir", b.Dir)
			return b, false, nil
		}
		return b, false, fmt.Errorf("spirebin: move the build into place: %w", err)
	}
	log.Info("built spire-server and spire-agent", "dir", b.Dir, "took", took)
	return b, true, nil
}

// cCompiler returns the C compiler cgo would use, or an error saying to
// install one.
func cCompiler(ctx context.Context, tools string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "env", "CC")
	cmd.Dir = tools
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("spirebin: go env CC: %w", err)
	}
	cc := strings.Fields(strings.TrimSpace(string(out)))
	if len(cc) == 0 {
		return "", errors.New("spirebin: go env CC is empty; the SPIRE server needs cgo (SQLite): install gcc")
	}
	path, err := exec.LookPath(cc[0])
	if err != nil {
		return "", fmt.Errorf("spirebin: the SPIRE server needs cgo (SQLite), and the C compiler %q is missing: install gcc (apt-get install gcc): %w", cc[0], err)
	}
	return path, nil
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
		return "", fmt.Errorf("spirebin: version of %s in %s: %w", module, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// cacheKey names a build: the first 16 hex digits of the SHA-256 of the
// tools module's go.mod and go.sum (kubebin.CacheKey), the build's command
// line and environment, and the target platform. A new SPIRE version, a
// new dependency or a change to how the programs are built makes a new
// key, so the next build does not reuse binaries built otherwise.
func cacheKey(tools string) (string, error) {
	mod, err := kubebin.CacheKey(tools)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "module %s\nbuild %q\nenv %q\nplatform %s/%s\n", mod,
		buildArgs("<dir>", "<version from go.mod>"), buildEnv, runtime.GOOS, runtime.GOARCH)
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// buildEnv is added to the environment of the build: the server keeps its
// registrations in SQLite, which needs cgo.
var buildEnv = []string{"CGO_ENABLED=1"}

// buildArgs is the go command line that builds both programs into dir,
// stripped, with the version stamped the way SPIRE's own build does, so
// that `spire-server --version` reports it.
func buildArgs(dir, version string) []string {
	ldflags := "-s -w -X " + spireModule + "/pkg/common/version.gittag=" + strings.TrimPrefix(version, "v")
	return []string{"build", "-trimpath", "-ldflags=" + ldflags, "-o", dir + string(filepath.Separator), serverPackage, agentPackage}
}

// goBuild builds both programs into dir (buildArgs, buildEnv).
func goBuild(ctx context.Context, tools, dir, version string) error {
	args := buildArgs(dir, version)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), buildEnv...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("spirebin: go %s (in %s): %w", strings.Join(args, " "), tools, err)
	}
	return nil
}
