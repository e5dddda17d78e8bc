// Command prometheus-binaries builds the Prometheus server that the
// real-cluster tests run (internal/kubecluster), from the nested module
// test/prometheus/tools, into the cache
// (/var/cache/mantlet/prometheus-<key> as root; $MANTLET_PROMETHEUS_CACHE
// moves it), unless it is there already. `make prometheus-binaries` runs
// it, and .ci/run before the tests. It prints the program's path.
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
	"github.com/mantlet/mantlet/internal/prombin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "prometheus-binaries:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("prometheus-binaries", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: prometheus-binaries [-C dir]\n\nBuilds Prometheus from %s into %s (or $%s), unless it is built.\n\n",
			prombin.ToolsModule, kubebin.DefaultCacheRoot, prombin.CacheEnv)
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
	p, _, err := prombin.Build(ctx, root, log)
	if err != nil {
		return err
	}
	fmt.Println(p.Path)
	return nil
}
