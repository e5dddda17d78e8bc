// Command kube-binaries builds the kube-apiserver and etcd that
// internal/kubetest runs, from the nested module test/kube/tools, into the
// cache (/var/cache/mantlet/kube-<key> as root; $MANTLET_KUBE_CACHE moves
// it), unless they are there already. `make kube-binaries` runs it, and
// .ci/run before the tests. It prints the binaries' folder.
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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-binaries:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kube-binaries", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: kube-binaries [-C dir]\n\nBuilds kube-apiserver and etcd from %s into %s (or $%s), unless they are built.\n\n",
			kubebin.ToolsModule, kubebin.DefaultCacheRoot, kubebin.CacheEnv)
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
	b, _, err := kubebin.Build(ctx, root, log)
	if err != nil {
		return err
	}
	fmt.Println(b.Dir)
	return nil
}
