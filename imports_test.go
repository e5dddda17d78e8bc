package mantlet_test

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/mantlet/mantlet/"

// boundaries are the rules of docs/architecture.md ("The code"): a package
// under from (a directory prefix) never imports a package under one of
// forbidden. Tests may; the rules are about the product.
var boundaries = []struct {
	from, why string
	forbidden []string
}{
	{"ztunnel", "the tunnel knows workloads and identities as values it is given, never where they come from or what watches it",
		[]string{"agent", "node", "source", "policy", "identity", "telemetry", "admin", "events", "bpf"}},
	{"policy", "policy decides; it never knows the tunnel, nor where a policy was read",
		[]string{"ztunnel", "source", "agent", "node"}},
	{"policy/enforce", "enforcement adapts the engine to the tunnel; it never knows a source's format",
		[]string{"source", "agent", "node"}},
	{"source", "a source emits states; it never knows who puts them in force",
		[]string{"node", "agent", "ztunnel", "bpf", "admin"}},
	{"agent", "the agent enrolls pods; the node assembles it with the rest",
		[]string{"node", "ztunnel", "source/file", "source/kubernetes"}},
	{"bpf", "the data path is driven, it drives nothing",
		[]string{"agent", "node", "ztunnel", "source", "policy", "identity", "telemetry", "admin"}},
	{"identity", "identities are values the rest uses",
		[]string{"agent", "node", "ztunnel", "source", "policy", "telemetry", "admin", "bpf"}},
}

// harness is the test harness and the scenarios built on it; product code
// never imports them (the commands may: 'mantlet demo', 'bench' and
// 'testbed' are their users).
var harness = []string{"internal/testbed", "internal/meshtest", "internal/kubetest", "internal/spiretest", "internal/privtest", "internal/scenario", "internal/peerbench", "internal/kubecluster", "internal/prombin", "internal/binbuild", "internal/proc", "admin/admintest", "ztunnel/internal/ztest"}

// TestImportBoundaries keeps the package map of docs/architecture.md true.
func TestImportBoundaries(t *testing.T) {
	imports := productImports(t)
	under := func(pkg, dir string) bool { return pkg == dir || strings.HasPrefix(pkg, dir+"/") }
	isHarness := func(pkg string) bool {
		return slices.ContainsFunc(harness, func(h string) bool { return under(pkg, h) })
	}
	for pkg, deps := range imports {
		if isHarness(pkg) {
			continue
		}
		for _, b := range boundaries {
			if !under(pkg, b.from) {
				continue
			}
			for _, dep := range deps {
				for _, f := range b.forbidden {
					// policy/enforce is under policy but is the one place
					// where policy meets the tunnel.
					if b.from == "policy" && under(pkg, "policy/enforce") && f == "ztunnel" {
						continue
					}
					if under(dep, f) && !under(dep, b.from) {
						t.Errorf("%s imports %s: %s", pkg, dep, b.why)
					}
				}
			}
		}
		if under(pkg, "cmd") {
			continue
		}
		for _, dep := range deps {
			if isHarness(dep) {
				t.Errorf("%s imports the test harness %s", pkg, dep)
			}
		}
	}
}

// productImports maps every package of the module (by directory) to the
// module's packages its non-test files import.
func productImports(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != "." && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil && path != "." {
				return filepath.SkipDir // nested module
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		pkg := filepath.ToSlash(filepath.Dir(path))
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if dep, ok := strings.CutPrefix(p, module); ok && !slices.Contains(out[pkg], dep) {
				out[pkg] = append(out[pkg], dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
