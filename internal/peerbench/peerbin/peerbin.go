// Package peerbin builds and finds the ghostunnel that the peer benchmark
// (internal/peerbench) runs as a sidecar-style mutual TLS pair. It
// describes it as a binbuild.Set: built from the nested module
// test/bench/tools into a cache folder keyed by that module's go.mod and
// go.sum.
package peerbin

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/mantlet/mantlet/internal/binbuild"
)

// ToolsModule is the nested module that pins ghostunnel, relative to the
// repository's root.
const ToolsModule = "test/bench/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default binbuild.DefaultCacheRoot as root, the user's cache directory
// otherwise).
const CacheEnv = "MANTLET_PEER_CACHE"

// ghostunnelModule is the module (and main package) of ghostunnel.
const ghostunnelModule = "github.com/ghostunnel/ghostunnel"

// ErrMissing means ghostunnel is not built for the tools module as it is
// now; `make peer-binaries` builds it.
var ErrMissing = errors.New("ghostunnel is not built")

// Set is ghostunnel: <cache root>/ghostunnel-<key>, where the key is
// binbuild.ModuleKey's.
var Set = binbuild.Set{
	Name:       "peer",
	Tools:      ToolsModule,
	Prefix:     "ghostunnel",
	CacheEnv:   CacheEnv,
	Programs:   []string{"ghostunnel"},
	Missing:    ErrMissing,
	FirstBuild: "a few minutes the first time",
	Compile:    compile,
}

// BuildInfo is what a build records next to the binary, in build.json.
type BuildInfo struct {
	Ghostunnel string `json:"ghostunnel"`
	binbuild.Stamp
}

// Ghostunnel is a ghostunnel built from ToolsModule: its folder, its path
// and its build.json.
type Ghostunnel = binbuild.Program[BuildInfo]

// Find returns the ghostunnel built for the mantlet repository that holds
// dir. If it is not built, the error wraps ErrMissing and says how to
// build it.
func Find(dir string) (Ghostunnel, error) { return binbuild.FindProgram[BuildInfo](Set, dir) }

// Build builds ghostunnel from the tools module of the repository at root
// into the cache, unless it is there already (then built is false); see
// binbuild.Set.Build.
func Build(ctx context.Context, root string, log *slog.Logger) (Ghostunnel, bool, error) {
	return binbuild.BuildProgram[BuildInfo](ctx, Set, root, log)
}

// compile builds ghostunnel into dir.
func compile(ctx context.Context, tools, dir string, log *slog.Logger) (binbuild.Record, error) {
	var info BuildInfo
	var err error
	if info.Ghostunnel, err = binbuild.ModuleVersion(ctx, tools, ghostunnelModule); err != nil {
		return nil, err
	}
	log.Info("building ghostunnel (2 to 3 minutes on 2 cores with empty Go caches)", "version", info.Ghostunnel)
	// With cgo (and so a C compiler): v1.8.4's stub for builds without
	// PKCS#11 support (no cgo, or the nopkcs11 tag) does not compile.
	// -s -w: no symbols, as release builds.
	if err := binbuild.GoBuild(ctx, tools, []string{"CGO_ENABLED=1"}, os.Stderr,
		"-trimpath", "-ldflags=-s -w -X main.version="+info.Ghostunnel, "-o", filepath.Join(dir, "ghostunnel"), ghostunnelModule); err != nil {
		return nil, err
	}
	return &info, nil
}
