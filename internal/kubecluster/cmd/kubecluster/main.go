// Command kubecluster brings up a real two-node Kubernetes cluster on this
// machine (internal/kubecluster: containerd, kubelet and kube-proxy in
// network namespaces, no Docker, no registry), installs mantlet with its
// Helm chart and runs the demo's checks on it, then stays until Ctrl-C,
// which removes everything. 'make demo-kubernetes' runs 'kubecluster up'.
//
//	kubecluster up [--name NAME] [--nodes N] [--cni ptp|bridge] [--proxy-mode iptables|nftables|none] [--no-mesh] [--no-demo]
//	kubecluster down --name NAME | --all
//	kubecluster list
//
// It needs root, the Kubernetes programs of 'make kube-binaries', Debian's
// containerd, runc, containernetworking-plugins and iptables, and a
// checkout of the repository (it builds the images from it).
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
	"path/filepath"
	"syscall"
	"time"

	"github.com/mantlet/mantlet/internal/kubecluster"
	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubecluster:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out io.Writer, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: kubecluster up|down|list [flags]")
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it builds network namespaces and runs containerd and kubelets; run it as root (for example: sudo make demo-kubernetes)")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	switch args[0] {
	case "up":
		return up(ctx, out, log, args[1:])
	case "down":
		fs := flag.NewFlagSet("down", flag.ContinueOnError)
		name := fs.String("name", "", "the cluster to remove")
		all := fs.Bool("all", false, "remove every cluster")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		names := []string{*name}
		if *all {
			m, err := kubecluster.List("")
			if err != nil {
				return err
			}
			names = names[:0]
			for n := range m {
				names = append(names, n)
			}
		} else if *name == "" {
			return errors.New("down: --name or --all")
		}
		var errs []error
		for _, n := range names {
			errs = append(errs, kubecluster.Down(n, "", log))
		}
		return errors.Join(errs...)
	case "list":
		m, err := kubecluster.List("")
		if err != nil {
			return err
		}
		for n, pid := range m {
			fmt.Fprintf(out, "%s\tpid %d\n", n, pid)
		}
		return nil
	default:
		return fmt.Errorf("unknown command %q: want up, down or list", args[0])
	}
}

func up(ctx context.Context, out io.Writer, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	name := fs.String("name", "mantlet", "the cluster's name (nodes are NAME-node1, ...)")
	nodes := fs.Int("nodes", 2, "number of nodes")
	cni := fs.String("cni", kubecluster.CNIPtp, "CNI plugin: ptp or bridge")
	proxyMode := fs.String("proxy-mode", kubecluster.ProxyIPTables, "kube-proxy's mode: iptables, nftables, or none (no kube-proxy)")
	noMesh := fs.Bool("no-mesh", false, "do not install mantlet")
	noDemo := fs.Bool("no-demo", false, "install mantlet but run no checks")
	if err := fs.Parse(args); err != nil {
		return err
	}
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	repo, err := kubebin.RepoRoot(wd)
	if err != nil {
		return err
	}
	bins, err := kubebin.Find()
	if err != nil {
		return err
	}
	start := time.Now()
	art := filepath.Join(kubecluster.DefaultRunRoot, "artifacts-"+*name)
	defer os.RemoveAll(art)
	fmt.Fprintln(out, "building the mantlet image and helm...")
	image, helm, err := kubecluster.BuildArtifacts(ctx, repo, art)
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "bringing up the cluster...")
	c, err := kubecluster.Up(ctx, kubecluster.Options{Name: *name, Nodes: *nodes, CNI: *cni, ProxyMode: *proxyMode, Repo: repo, Binaries: &bins, Images: []string{image}, Log: log})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Fprintln(out, "removing the cluster...")
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "kubecluster:", err)
		}
	}()
	fmt.Fprintf(out, "cluster %s up (%d nodes, CNI %s, kube-proxy %s) in %s\n", c.Name, len(c.Nodes), *cni, *proxyMode, time.Since(start).Round(time.Second))
	if !*noMesh {
		fmt.Fprintln(out, "helm install mantlet deploy/charts/mantlet -n mantlet-system ...")
		if err := c.InstallMantlet(ctx, kubecluster.MeshOptions{Helm: helm, Repo: repo}); err != nil {
			return err
		}
		fmt.Fprintln(out, "mantlet's agents are Ready on every node")
		if !*noDemo {
			fmt.Fprintln(out, "checks:")
			if err := c.Demo(ctx, out); err != nil {
				return err
			}
		}
	}
	cp := c.Testbed.ControlPlane()
	fmt.Fprintf(out, `
The cluster runs until you press Ctrl-C. From another shell, as root:
  nsenter --net=%s %s --kubeconfig %s get pods -A -o wide
Nodes' logs (containerd, kubelet, kube-proxy) and pod logs: %s/<node>/
`, cp.NS, bins.Kubectl, c.Kubeconfig, c.Dir)
	<-ctx.Done()
	return nil
}
