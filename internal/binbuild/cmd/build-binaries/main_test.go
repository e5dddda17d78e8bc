package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/binbuild"
)

func TestHelpNamesEverySet(t *testing.T) {
	var out, errs bytes.Buffer
	if err := run(context.Background(), &out, &errs, []string{"-h"}); err == nil {
		t.Error("-h: want flag.ErrHelp")
	}
	for _, s := range sets {
		if !strings.Contains(errs.String(), "  "+s.Name+" ") || !strings.Contains(errs.String(), s.CacheEnv) {
			t.Errorf("the usage does not name the set %q and $%s:\n%s", s.Name, s.CacheEnv, errs.String())
		}
	}
}

func TestNoSetOrAnUnknownOneIsRefused(t *testing.T) {
	for _, args := range [][]string{nil, {"kube", "nope"}} {
		var out, errs bytes.Buffer
		if err := run(context.Background(), &out, &errs, args); err == nil || out.Len() > 0 {
			t.Errorf("build-binaries %q: %v, printed %q; want an error and nothing printed", args, err, out.String())
		}
	}
}

// TestBuiltSetsArePrintedNotBuilt: with every set's programs in its cache
// folder, the command prints the folders of the sets it is given, in
// order, without building anything (no set's build could finish in the
// test's time).
func TestBuiltSetsArePrintedNotBuilt(t *testing.T) {
	root, err := binbuild.RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, s := range sets {
		t.Setenv(s.CacheEnv, t.TempDir())
		dir, err := s.Dir(root)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, p := range s.Programs {
			if err := os.WriteFile(filepath.Join(dir, p), []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		want = append(want, dir)
	}
	var out, errs bytes.Buffer
	args := []string{"-C", root}
	for _, s := range sets {
		args = append(args, s.Name)
	}
	if err := run(context.Background(), &out, &errs, args); err != nil {
		t.Fatalf("build-binaries %q: %v\n%s", args, err, errs.String())
	}
	if got := strings.Fields(out.String()); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("printed %q; want %q", got, want)
	}
}
