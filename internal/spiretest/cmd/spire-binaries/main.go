// Command spire-binaries builds the spire-server and spire-agent that
// internal/spiretest runs, from the nested module test/spire/tools, into
// the cache (/var/cache/mantlet/spire-<key> as root; $MANTLET_SPIRE_CACHE
// moves it), unless they are there already. `make spire-binaries` runs
// it, and .ci/run before the tests. It prints the binaries' folder.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/spiretest/spirebin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "spire-binaries:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("spire-binaries", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: spire-binaries [-C dir]\n\nBuilds spire-server and spire-agent from %s into %s (or $%s), unless they are built. Needs gcc (cgo, for SQLite).\n\n",
			spirebin.ToolsModule, kubebin.DefaultCacheRoot, spirebin.CacheEnv)
		fs.PrintDefaults()
	}
	dir := fs.String("C", ".", "a folder in the mantlet repository")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	root, err := kubebin.RepoRoot(*dir)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	b, _, err := spirebin.Build(ctx, root, log)
	if err != nil {
		return err
	}
	fmt.Println(b.Dir)
	return nil
}
