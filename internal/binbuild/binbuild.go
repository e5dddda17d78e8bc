// Package binbuild builds the external programs that the tests and the
// benchmarks run (the Kubernetes programs, SPIRE, ghostunnel, Prometheus)
// from nested Go modules of the repository that pin them, into a cache
// folder keyed by a hash of the module's go.mod and go.sum, and finds them
// there. What differs between those program sets (which module, which
// programs, how they are built, what the error says when they are
// missing) is a Set, described by kubebin, spirebin, peerbin and prombin;
// the rest is here. It depends on nothing but the standard library, so
// that the command that builds them (cmd/build-binaries) compiles in a
// moment.
package binbuild

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// DefaultCacheRoot is where root keeps the builds.
const DefaultCacheRoot = "/var/cache/mantlet"

// rootModule is the module path that marks the repository's root.
const rootModule = "github.com/mantlet/mantlet"

// A Set is a group of programs built together from one nested module.
type Set struct {
	// Name names the set on build-binaries' command line and in its make
	// target, <Name>-binaries.
	Name string
	// Tools is the nested module that pins the programs, relative to the
	// repository's root.
	Tools string
	// Prefix starts the name of the build's folder in the cache:
	// <cache root>/<Prefix>-<key>.
	Prefix string
	// CacheEnv names the environment variable that moves the cache.
	CacheEnv string
	// Programs are the files a build leaves in its folder, all
	// executable; the set is built when every one is there.
	Programs []string
	// Missing is the error that Find wraps when the set is not built.
	Missing error
	// FirstBuild says what the first build takes, for Find's error
	// ("a few minutes the first time").
	FirstBuild string
	// Key returns the key of the build of the tools module in a folder;
	// nil means ModuleKey.
	Key func(tools string) (string, error)
	// Compile builds the programs of the tools module tools into the
	// empty folder dir, and returns what build.json records about them.
	// It logs what it builds.
	Compile func(ctx context.Context, tools, dir string, log *slog.Logger) (Record, error)
}

// Record is what a build records next to its programs, in build.json: a
// set's own fields (versions) in a struct that embeds Stamp, which Build
// fills.
type Record interface {
	stamp() *Stamp
}

// Stamp is the part of build.json that every set has.
type Stamp struct {
	// Go is the version of the go command that built the programs.
	Go string `json:"go"`
	// Built is when the build finished, and Took how long it took.
	Built time.Time `json:"built"`
	Took  string    `json:"took"`
}

func (s *Stamp) stamp() *Stamp { return s }

// RepoRoot returns the root of the mantlet repository that holds dir (or
// one of dir's parents): the folder whose go.mod declares the module
// github.com/mantlet/mantlet.
func RepoRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("binbuild: find the repository: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && modulePath(b) == rootModule {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("binbuild: no go.mod of %s in %s or above", rootModule, dir)
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

// ModuleKey returns the key of the build of the tools module in dir: the
// first 16 hex digits of the SHA-256 of its go.mod and go.sum. go.sum pins
// every module that goes into the programs; go.mod adds the replace lines
// and the tools to build, which go.sum does not show. extra, if any, is
// hashed after them (what else the build depends on, such as build tags).
func ModuleKey(dir string, extra ...string) (string, error) {
	h := sha256.New()
	for _, name := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "", fmt.Errorf("binbuild: cache key of %s: %w", dir, err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(b))
		h.Write(b)
	}
	for _, s := range extra {
		io.WriteString(h, s)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// CacheRoot returns the directory that holds the set's builds: $CacheEnv
// if set, DefaultCacheRoot as root, else <user cache dir>/mantlet.
func (s Set) CacheRoot() (string, error) {
	if d := os.Getenv(s.CacheEnv); d != "" {
		return filepath.Abs(d)
	}
	if os.Geteuid() == 0 {
		return DefaultCacheRoot, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("binbuild: no cache directory for the %s binaries (set %s): %w", s.Name, s.CacheEnv, err)
	}
	return filepath.Join(d, "mantlet"), nil
}

// Dir returns the folder of the build of the repository at root, built or
// not.
func (s Set) Dir(root string) (string, error) {
	key := s.Key
	if key == nil {
		key = func(tools string) (string, error) { return ModuleKey(tools) }
	}
	k, err := key(filepath.Join(root, s.Tools))
	if err != nil {
		return "", err
	}
	cache, err := s.CacheRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, s.Prefix+"-"+k), nil
}

// Present reports whether every program is in dir, a regular file that
// its owner may run.
func (s Set) Present(dir string) bool {
	for _, name := range s.Programs {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0 {
			return false
		}
	}
	return true
}

// Find returns the folder of the build for the mantlet repository that
// holds dir. If it is not built, the error wraps s.Missing and says how to
// build it.
func (s Set) Find(dir string) (string, error) {
	root, err := RepoRoot(dir)
	if err != nil {
		return "", err
	}
	d, err := s.Dir(root)
	if err != nil {
		return "", err
	}
	if !s.Present(d) {
		return "", fmt.Errorf("binbuild: %w in %s: run 'make %s-binaries' (%s, then cached; %s moves the cache)", s.Missing, d, s.Name, s.FirstBuild, s.CacheEnv)
	}
	return d, nil
}

// Build builds the set from the tools module of the repository at root
// into the cache, unless it is there already (then built is false), and
// returns its folder. It builds into a temporary folder next to the final
// one and renames it, so that a cancelled or failed build leaves nothing
// that looks built; of two builds at once, the second to finish uses the
// first's.
func (s Set) Build(ctx context.Context, root string, log *slog.Logger) (dir string, built bool, err error) {
	dir, err = s.Dir(root)
	if err != nil {
		return "", false, err
	}
	log = log.With("set", s.Name, "dir", dir)
	if s.Present(dir) {
		log.Info("built already")
		return dir, false, nil
	}
	if _, err := exec.LookPath("go"); err != nil {
		return dir, false, fmt.Errorf("binbuild: build the %s binaries: no go command in PATH: %w", s.Name, err)
	}
	start := time.Now()
	cache := filepath.Dir(dir)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return dir, false, fmt.Errorf("binbuild: create the cache %s: %w", cache, err)
	}
	tmp, err := os.MkdirTemp(cache, filepath.Base(dir)+".building-")
	if err != nil {
		return dir, false, fmt.Errorf("binbuild: build folder: %w", err)
	}
	defer os.RemoveAll(tmp) // empty after the rename
	rec, err := s.Compile(ctx, filepath.Join(root, s.Tools), tmp, log)
	if err != nil {
		return dir, false, err
	}
	took := time.Since(start).Round(time.Second)
	*rec.stamp() = Stamp{Go: runtime.Version(), Built: time.Now().UTC(), Took: took.String()}
	j, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return dir, false, fmt.Errorf("binbuild: encode build.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(j, '\n'), 0o644); err != nil {
		return dir, false, fmt.Errorf("binbuild: write build.json: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return dir, false, fmt.Errorf("binbuild: build folder: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		if s.Present(dir) {
			log.Info("another build finished first; using it")
			return dir, false, nil
		}
		return dir, false, fmt.Errorf("binbuild: move the build into place: %w", err)
	}
	log.Info("built", "took", took)
	return dir, true, nil
}

// Program is a build of a set of one program (Programs[0]).
type Program[R any] struct {
	// Dir holds it: <cache root>/<Prefix>-<key>.
	Dir string
	// Path is the program's path.
	Path string
	// Info is its build.json, a set's BuildInfo (zero if there is none).
	Info R
}

// program names the set's one program in dir and reads its build.json
// (a build without one, or with a broken one, leaves Info zero).
func program[R any](s Set, dir string) Program[R] {
	p := Program[R]{Dir: dir, Path: filepath.Join(dir, s.Programs[0])}
	if b, err := os.ReadFile(filepath.Join(dir, "build.json")); err == nil {
		_ = json.Unmarshal(b, &p.Info)
	}
	return p
}

// FindProgram is s.Find for a set of one program whose build.json is R.
func FindProgram[R any](s Set, dir string) (Program[R], error) {
	d, err := s.Find(dir)
	if err != nil {
		return Program[R]{}, err
	}
	return program[R](s, d), nil
}

// BuildProgram is s.Build for a set of one program whose build.json is R.
func BuildProgram[R any](ctx context.Context, s Set, root string, log *slog.Logger) (Program[R], bool, error) {
	d, built, err := s.Build(ctx, root, log)
	if err != nil {
		return Program[R]{}, false, err
	}
	return program[R](s, d), built, nil
}

// ModuleVersion asks the go command which version of module the tools
// module uses.
func ModuleVersion(ctx context.Context, tools, module string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", module)
	cmd.Dir = tools
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return "", fmt.Errorf("binbuild: version of %s in %s: %w", module, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// GoBuild runs `go build args...` in the tools module, with env added to
// the environment and the go command's output going to out.
func GoBuild(ctx context.Context, tools string, env []string, out io.Writer, args ...string) error {
	args = append([]string{"build"}, args...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("binbuild: go %s (in %s): %w", strings.Join(args, " "), tools, err)
	}
	return nil
}
