// Command peer-binaries builds the ghostunnel that the peer benchmark runs
// (internal/peerbench), from the nested module test/bench/tools, into the
// cache (/var/cache/mantlet/ghostunnel-<key> as root; $MANTLET_PEER_CACHE
// moves it), unless it is there already. `make peer-binaries` runs it, and
// .ci/run before the tests. It prints the program's path.
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
	"github.com/mantlet/mantlet/internal/peerbench/peerbin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer-binaries:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("peer-binaries", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: peer-binaries [-C dir]\n\nBuilds ghostunnel from %s into %s (or $%s), unless it is built.\n\n",
			peerbin.ToolsModule, kubebin.DefaultCacheRoot, peerbin.CacheEnv)
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
	g, _, err := peerbin.Build(ctx, root, log)
	if err != nil {
		return err
	}
	fmt.Println(g.Path)
	return nil
}
