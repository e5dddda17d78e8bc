// Command build-binaries builds the external programs that the tests and
// benchmarks run, each set from its nested module into the cache
// (/var/cache/mantlet/<prefix>-<key> as root; each set's $MANTLET_*_CACHE
// moves it), unless they are there already, and prints each set's folder.
// The sets: kube (kube-apiserver, etcd, kubelet, kube-proxy,
// kube-controller-manager, kube-scheduler, kubectl; test/kube/tools),
// spire (spire-server, spire-agent; test/spire/tools), peer (ghostunnel;
// test/bench/tools) and prometheus (test/prometheus/tools). `make
// <set>-binaries` runs it, and .ci/run before the tests.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/mantlet/mantlet/internal/binbuild"
	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/peerbench/peerbin"
	"github.com/mantlet/mantlet/internal/prombin"
	"github.com/mantlet/mantlet/internal/spiretest/spirebin"
)

// sets are the program sets, by the names the command line uses.
var sets = []binbuild.Set{kubebin.Set, spirebin.Set, peerbin.Set, prombin.Set}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Stderr, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "build-binaries:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, stdout, stderr io.Writer, args []string) error {
	fs := flag.NewFlagSet("build-binaries", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: build-binaries [-C dir] set...\n\nBuilds each set of programs from its nested module into %s (or the set's $MANTLET_*_CACHE), unless it is built, and prints its folder. The sets:\n\n",
			binbuild.DefaultCacheRoot)
		for _, s := range sets {
			fmt.Fprintf(fs.Output(), "  %-11s %s from %s ($%s)\n", s.Name, strings.Join(s.Programs, ", "), s.Tools, s.CacheEnv)
		}
		fmt.Fprintln(fs.Output())
		fs.PrintDefaults()
	}
	dir := fs.String("C", ".", "a folder in the mantlet repository")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var todo []binbuild.Set
	for _, name := range fs.Args() {
		i := slices.IndexFunc(sets, func(s binbuild.Set) bool { return s.Name == name })
		if i < 0 {
			fs.Usage()
			return fmt.Errorf("no set of programs named %q", name)
		}
		todo = append(todo, sets[i])
	}
	if len(todo) == 0 {
		fs.Usage()
		return errors.New("name a set of programs to build")
	}
	root, err := binbuild.RepoRoot(*dir)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	for _, s := range todo {
		d, _, err := s.Build(ctx, root, log)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, d)
	}
	return nil
}
