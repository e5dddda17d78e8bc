package main

import (
	"context"
	"fmt"
	"os"

	"github.com/mantlet/mantlet/internal/scenario"
)

func init() {
	register(command{name: "demo", summary: "run a two-node mesh of network namespaces and show what it does (root)", run: runDemo})
}

const demoSynopsis = `[--keep] [--binary PATH]

Builds a two-node cluster out of network namespaces on this machine (nothing
is added to the machine's own network namespace), starts a mantlet agent on
each node with a demo CA, sends traffic between meshed pods and between
unmeshed pods, captures the wire between the nodes, and prints what it saw.
Everything is removed at the end, on failure and on Ctrl-C. It exits non-zero
if a check fails. Needs root (namespaces, eBPF).`

// scenarioBinary checks that the scenario command name (demo, bench) runs
// as root and returns the mantlet executable that runs its agents: binary,
// else this one.
func scenarioBinary(name, binary string) (string, error) {
	if geteuid() != 0 {
		return "", errNeedsRoot(name)
	}
	if binary != "" {
		return binary, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("find the mantlet executable: %w", err)
	}
	return exe, nil
}

func runDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "demo", demoSynopsis)
	opts := scenario.DemoOptions{Stdout: e.stdout, Stderr: e.stderr}
	fs.BoolVar(&opts.Keep, "keep", false, "leave the mesh running after the report, with instructions to explore it; Ctrl-C removes it")
	binary := fs.String("binary", "", "mantlet executable that runs the agents (default: this one)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet demo: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	bin, err := scenarioBinary("demo", *binary)
	if err != nil {
		return err
	}
	return scenario.Demo(ctx, bin, opts)
}
