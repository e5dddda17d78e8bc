package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// env is what a subcommand may touch of the outside world, so tests can
// swap it.
type env struct {
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

func newEnv() *env { return &env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv} }

// newContext is cancelled on SIGINT or SIGTERM so that long subcommands
// (agent, demo, testbed) clean up.
func newContext() context.Context {
	ctx, _ := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	return ctx
}

// command is one subcommand. Each lives in its own file and registers itself
// from init.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

var commands = map[string]command{}

func register(c command) {
	if _, dup := commands[c.name]; dup {
		panic("mantlet: duplicate subcommand " + c.name)
	}
	commands[c.name] = c
}

// errUsage marks an error whose message has already been printed with the
// usage text; run exits 2 for it.
var errUsage = errors.New("usage")

func run(ctx context.Context, e *env, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(e.stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(e.stderr, "mantlet: unknown command %q; run 'mantlet help' for the list\n", args[0])
		return 2
	}
	err := c.run(ctx, e, args[1:])
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(e.stderr, "mantlet %s: %v\n", c.name, err)
		return 1
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "mantlet: a sidecarless, eBPF-assisted service mesh.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: mantlet <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'mantlet <command> -h' for a command's flags.")
}

// newFlagSet returns a flag set that prints its usage to e.stderr and
// returns errors instead of exiting.
func newFlagSet(e *env, name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet("mantlet "+name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mantlet %s %s\n\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args and turns a flag error into errUsage (the flag
// package has already printed it).
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}
