package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"text/tabwriter"
	"time"

	"github.com/mantlet/mantlet/internal/testbed"
	"sigs.k8s.io/yaml"
)

func init() {
	register(command{name: "testbed", summary: "build, list and remove clusters of network namespaces", run: runTestbed})
}

// testbedCommands are the subcommands of 'mantlet testbed'.
var testbedCommands = map[string]subcommand{
	"up":   {"build a testbed and leave it running (or keep it in the foreground)", testbedUp},
	"down": {"remove a testbed, or all of them", testbedDown},
	"list": {"list the testbeds recorded in the state directory", testbedList},
}

func runTestbed(ctx context.Context, e *env, args []string) error {
	return group{name: "testbed", commands: testbedCommands, about: `Builds a cluster on this machine out of network namespaces: nodes joined by
an underlay bridge, pods joined to their node like a routed CNI. Nothing is
added to the machine's own network namespace.`}.run(ctx, e, args)
}

func stateDirFlag(fs *flag.FlagSet) *string {
	return fs.String("state-dir", testbed.DefaultStateDir, "directory of the testbeds' state files")
}

func testbedLogger(e *env) *slog.Logger {
	return slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func testbedUp(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "testbed up", "[flags]\n\nBuilds a testbed and leaves it running (unless --foreground); Ctrl-C while it builds removes what was made.")
	nodes := fs.Int("nodes", 2, "number of nodes (node1, node2, ...)")
	perNode := fs.Int("pods-per-node", 2, "pods on each node (pod-<node>-<k>)")
	namespace := fs.String("namespace", "default", "Kubernetes namespace of the pods made by --nodes")
	mesh := fs.Bool("mesh", false, "annotate that namespace with mantlet.io/mesh: enabled")
	file := fs.String("file", "", "YAML spec of the cluster (nodes, pods, namespaces, services) instead of --nodes/--pods-per-node")
	prefix := fs.String("prefix", "", "name prefix, 1-12 lower-case letters and digits (default: random)")
	foreground := fs.Bool("foreground", false, "stay in the foreground and remove the testbed on Ctrl-C")
	stateDir := stateDirFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet testbed up: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	if err := requireRootTestbed(); err != nil {
		return err
	}
	var spec testbed.Spec
	if *file != "" {
		explicit := false
		fs.Visit(func(f *flag.Flag) {
			explicit = explicit || f.Name == "nodes" || f.Name == "pods-per-node" || f.Name == "namespace" || f.Name == "mesh"
		})
		if explicit {
			fmt.Fprintln(e.stderr, "mantlet testbed up: --file describes the whole cluster; drop --nodes, --pods-per-node, --namespace and --mesh")
			return errUsage
		}
		b, err := os.ReadFile(*file)
		if err != nil {
			return fmt.Errorf("read spec: %w", err)
		}
		if err := yaml.UnmarshalStrict(b, &spec); err != nil {
			return fmt.Errorf("spec %s: %w", *file, err)
		}
	} else {
		if *nodes < 1 || *perNode < 0 {
			fmt.Fprintln(e.stderr, "mantlet testbed up: --nodes must be at least 1 and --pods-per-node at least 0")
			return errUsage
		}
		spec = testbed.SimpleSpec(*nodes, *perNode, *namespace)
		if *mesh {
			spec.Namespaces = map[string]map[string]string{*namespace: {"mantlet.io/mesh": "enabled"}}
		}
	}
	opts := []testbed.Option{testbed.WithStateDir(*stateDir), testbed.WithLogger(testbedLogger(e))}
	if *prefix != "" {
		opts = append(opts, testbed.WithPrefix(*prefix))
	}
	tb, err := testbed.New(ctx, spec, opts...)
	if err != nil {
		return err
	}
	manifest, err := tb.WriteManifest()
	if err != nil {
		return errors.Join(err, tb.Close())
	}
	printTestbed(e.stdout, tb, manifest, *foreground)
	if !*foreground {
		return nil
	}
	<-ctx.Done()
	fmt.Fprintf(e.stdout, "removing testbed %s\n", tb.Prefix())
	return tb.Close()
}

func printTestbed(w io.Writer, tb *testbed.Testbed, manifest string, foreground bool) {
	fmt.Fprintf(w, "testbed %s: %d nodes, %d pods\n\n", tb.Prefix(), len(tb.Nodes()), len(tb.Pods()))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tNODE\tIP\tINTERFACE\tNETWORK NAMESPACE")
	fmt.Fprintf(tw, "underlay\t%s\t-\t-\t%s\t%s\n", testbed.BridgeName, testbed.BridgeName, tb.Underlay())
	for _, n := range tb.Nodes() {
		fmt.Fprintf(tw, "node\t%s\t%s\t%s (pods %s)\t%s\t%s\n", n.Name, n.Name, n.IP, n.PodCIDR, n.Uplink, n.NS)
		for _, p := range n.Pods {
			fmt.Fprintf(tw, "pod\t%s/%s\t%s\t%s\t%s (host side %s)\t%s\n", p.Namespace, p.Name, p.Node, p.IP, testbed.PodInterface, p.HostVeth, p.NS)
		}
	}
	for _, s := range tb.Services() {
		fmt.Fprintf(tw, "service\t%s/%s\t-\t%s\t-\t-\n", s.Namespace, s.Name, s.IP)
	}
	tw.Flush()
	n1 := tb.Nodes()[0]
	fmt.Fprintf(w, "\nManifest for the agents (standalone mode): %s\n", manifest)
	if pods := tb.Pods(); len(pods) > 0 {
		fmt.Fprintf(w, "Enter a pod:      nsenter --net=%s bash\n", pods[0].NS)
	}
	fmt.Fprintf(w, "Run an agent:     nsenter --net=%s mantlet agent --node-name %s --config %s --ca-dir DIR --pin-dir /sys/fs/bpf/mantlet/%s-%s\n",
		n1.NS, n1.Name, manifest, tb.Prefix(), n1.Name)
	fmt.Fprintf(w, "Watch the wire:   nsenter --net=%s tcpdump -ni any  (frames cross the bridge ports, not %s)\n", tb.Underlay(), testbed.BridgeName)
	if foreground {
		fmt.Fprintln(w, "Press Ctrl-C to remove the testbed.")
	} else {
		fmt.Fprintf(w, "Tear it down:     mantlet testbed down --prefix %s\n", tb.Prefix())
	}
}

func testbedDown(_ context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "testbed down", "--prefix P | --all\n\nRemoves a testbed (its namespaces, links and files), also one whose builder died.\nIf a namespace cannot be removed, it names what remains, exits 1 and keeps the\ntestbed listed, so that 'down' can try again.")
	prefix := fs.String("prefix", "", "prefix of the testbed to remove")
	all := fs.Bool("all", false, "remove every testbed recorded in the state directory")
	stateDir := stateDirFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if (*prefix == "") == !*all || fs.NArg() > 0 {
		fmt.Fprintln(e.stderr, "mantlet testbed down: give either --prefix P or --all")
		return errUsage
	}
	if err := requireRootTestbed(); err != nil {
		return err
	}
	opts := []testbed.Option{testbed.WithStateDir(*stateDir), testbed.WithLogger(testbedLogger(e))}
	if *all {
		removed, err := testbed.RemoveAll(opts...)
		for _, p := range removed {
			fmt.Fprintf(e.stdout, "removed testbed %s\n", p)
		}
		if len(removed) == 0 && err == nil {
			fmt.Fprintln(e.stdout, "no testbeds")
		}
		return err
	}
	if err := testbed.ValidatePrefix(*prefix); err != nil {
		return err
	}
	if err := testbed.Remove(*prefix, opts...); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "removed testbed %s\n", *prefix)
	return nil
}

func testbedList(_ context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "testbed list", "\n\nLists the testbeds recorded in the state directory.")
	stateDir := stateDirFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	infos, err := testbed.List(testbed.WithStateDir(*stateDir))
	if err != nil {
		return err
	}
	if len(infos) == 0 {
		fmt.Fprintln(e.stdout, "no testbeds")
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PREFIX\tNODES\tPODS\tNAMESPACES\tCREATED\tBY PID\tNOTE")
	for _, in := range infos {
		note := ""
		switch {
		case in.Err != nil:
			note = in.Err.Error()
		case in.Namespaces < 1+in.Nodes+in.Pods:
			note = "incomplete: remove it with 'mantlet testbed down'"
		}
		created := "-"
		if !in.Created.IsZero() {
			created = in.Created.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d\t%s\n", in.Prefix, in.Nodes, in.Pods, in.Namespaces, created, in.PID, note)
	}
	return tw.Flush()
}
