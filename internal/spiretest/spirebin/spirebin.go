// Package spirebin builds and finds the spire-server and spire-agent that
// internal/spiretest runs. It describes them as a binbuild.Set: built from
// the nested module test/spire/tools into a cache folder keyed by that
// module's go.mod and go.sum, the build's command line and environment,
// and the platform.
package spirebin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/mantlet/mantlet/internal/binbuild"
)

// ToolsModule is the nested module that pins SPIRE, relative to the
// repository's root.
const ToolsModule = "test/spire/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default binbuild.DefaultCacheRoot as root, the user's cache directory
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

// Set is spire-server and spire-agent: <cache root>/spire-<key> (see
// cacheKey).
var Set = binbuild.Set{
	Name:       "spire",
	Tools:      ToolsModule,
	Prefix:     "spire",
	CacheEnv:   CacheEnv,
	Programs:   []string{"spire-server", "spire-agent"},
	Missing:    ErrMissing,
	FirstBuild: "needs gcc; several minutes on 2 cores the first time",
	Key:        cacheKey,
	Compile:    compile,
}

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

// Find returns the binaries built for the repository that holds the
// working directory. If they are not built, the error wraps ErrMissing and
// says how to build them.
func Find() (Binaries, error) {
	dir, err := Set.Find(".")
	if err != nil {
		return Binaries{}, err
	}
	return binariesIn(dir), nil
}

// Build builds spire-server and spire-agent from the tools module of the
// repository at root into the cache, unless they are there already (then
// built is false); see binbuild.Set.Build.
func Build(ctx context.Context, root string, log *slog.Logger) (Binaries, bool, error) {
	dir, built, err := Set.Build(ctx, root, log)
	return binariesIn(dir), built, err
}

// BuildInfo is what a build records next to the binaries, in build.json.
type BuildInfo struct {
	SPIRE string `json:"spire"`
	CC    string `json:"cc"`
	binbuild.Stamp
}

// compile builds both programs into dir (buildArgs, buildEnv).
func compile(ctx context.Context, tools, dir string, log *slog.Logger) (binbuild.Record, error) {
	var info BuildInfo
	var err error
	// The server keeps its registrations in SQLite, which needs cgo.
	if info.CC, err = cCompiler(ctx, tools); err != nil {
		return nil, err
	}
	if info.SPIRE, err = binbuild.ModuleVersion(ctx, tools, spireModule); err != nil {
		return nil, err
	}
	log.Info("building spire-server and spire-agent (cgo, for SQLite; several minutes on 2 cores with empty Go caches)",
		"spire", info.SPIRE, "cc", info.CC)
	if err := binbuild.GoBuild(ctx, tools, buildEnv, os.Stderr, buildArgs(dir, info.SPIRE)...); err != nil {
		return nil, err
	}
	return &info, nil
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

// cacheKey names a build: the first 16 hex digits of the SHA-256 of the
// tools module's go.mod and go.sum (binbuild.ModuleKey), the build's
// command line and environment, and the target platform. A new SPIRE
// version, a new dependency or a change to how the programs are built
// makes a new key, so the next build does not reuse binaries built
// otherwise.
func cacheKey(tools string) (string, error) {
	mod, err := binbuild.ModuleKey(tools)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "module %s\nbuild %q\nenv %q\nplatform %s/%s\n", mod,
		append([]string{"build"}, buildArgs("<dir>", "<version from go.mod>")...), buildEnv, runtime.GOOS, runtime.GOARCH)
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// buildEnv is added to the environment of the build: the server keeps its
// registrations in SQLite, which needs cgo.
var buildEnv = []string{"CGO_ENABLED=1"}

// buildArgs is the arguments of go build that build both programs into
// dir, stripped, with the version stamped the way SPIRE's own build does,
// so that `spire-server --version` reports it.
func buildArgs(dir, version string) []string {
	ldflags := "-s -w -X " + spireModule + "/pkg/common/version.gittag=" + strings.TrimPrefix(version, "v")
	return []string{"-trimpath", "-ldflags=" + ldflags, "-o", dir + string(filepath.Separator), serverPackage, agentPackage}
}
