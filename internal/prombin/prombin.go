// Package prombin builds and finds the Prometheus server that the
// real-cluster tests (internal/kubecluster) run: Debian's prometheus
// package is built without Kubernetes service discovery, so it is built
// from the nested module test/prometheus/tools, with only that discovery
// mechanism. It describes it as a binbuild.Set, in a cache folder keyed by
// that module's go.mod and go.sum and the build tags.
package prombin

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/mantlet/mantlet/internal/binbuild"
)

// ToolsModule is the nested module that pins Prometheus, relative to the
// repository's root.
const ToolsModule = "test/prometheus/tools"

// CacheEnv names the environment variable that moves the binary cache
// (default binbuild.DefaultCacheRoot as root, the user's cache directory
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

// Set is the Prometheus server: <cache root>/prometheus-<key>, where the
// key is binbuild.ModuleKey's over go.mod, go.sum and the build tags.
var Set = binbuild.Set{
	Name:       "prometheus",
	Tools:      ToolsModule,
	Prefix:     "prometheus",
	CacheEnv:   CacheEnv,
	Programs:   []string{"prometheus"},
	Missing:    ErrMissing,
	FirstBuild: "a few minutes the first time",
	Key:        func(tools string) (string, error) { return binbuild.ModuleKey(tools, "tags "+Tags+"\n") },
	Compile:    compile,
}

// BuildInfo is what a build records next to the binary, in build.json.
type BuildInfo struct {
	Prometheus string `json:"prometheus"`
	Tags       string `json:"tags"`
	binbuild.Stamp
}

// Prometheus is a Prometheus server built from ToolsModule: its folder,
// its path and its build.json.
type Prometheus = binbuild.Program[BuildInfo]

// Find returns the Prometheus built for the mantlet repository that holds
// dir. If it is not built, the error wraps ErrMissing and says how to
// build it.
func Find(dir string) (Prometheus, error) { return binbuild.FindProgram[BuildInfo](Set, dir) }

// Build builds Prometheus from the tools module of the repository at root
// into the cache, unless it is there already (then built is false); see
// binbuild.Set.Build.
func Build(ctx context.Context, root string, log *slog.Logger) (Prometheus, bool, error) {
	return binbuild.BuildProgram[BuildInfo](ctx, Set, root, log)
}

// compile builds the server into dir.
func compile(ctx context.Context, tools, dir string, log *slog.Logger) (binbuild.Record, error) {
	info := BuildInfo{Tags: Tags}
	var err error
	if info.Prometheus, err = binbuild.ModuleVersion(ctx, tools, prometheusModule); err != nil {
		return nil, err
	}
	log.Info("building prometheus (a few minutes on 2 cores with empty Go caches)", "version", info.Prometheus, "tags", Tags)
	// Without the web UI's assets (the builtinassets tag): the tests use
	// the HTTP API only. -s -w: no symbols, as release builds.
	if err := binbuild.GoBuild(ctx, tools, []string{"CGO_ENABLED=0"}, os.Stderr,
		"-trimpath", "-tags", Tags, "-ldflags=-s -w", "-o", filepath.Join(dir, "prometheus"), mainPackage); err != nil {
		return nil, err
	}
	return &info, nil
}
