package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
)

// subcommand is one subcommand of a group such as 'mantlet ca'.
type subcommand struct {
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// group is a command made of subcommands: 'mantlet <name> <subcommand>'.
type group struct {
	name     string
	about    string // what the command is for, under the usage line; may be empty
	commands map[string]subcommand
}

func (g group) usage(w io.Writer) {
	fmt.Fprintf(w, "Usage: mantlet %s <subcommand> [flags]\n", g.name)
	fmt.Fprintln(w)
	if g.about != "" {
		fmt.Fprintln(w, g.about)
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "Subcommands:")
	names := slices.Sorted(maps.Keys(g.commands))
	width := 0
	for _, n := range names {
		width = max(width, len(n)+1)
	}
	for _, n := range names {
		fmt.Fprintf(w, "  %-*s %s\n", width, n, g.commands[n].summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Run 'mantlet %s <subcommand> -h' for its flags.\n", g.name)
}

// run dispatches args[0] to its subcommand; no subcommand or an unknown
// one prints the usage and returns errUsage, -h and help return
// flag.ErrHelp.
func (g group) run(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		g.usage(e.stderr)
		return errUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		g.usage(e.stderr)
		return flag.ErrHelp
	}
	c, ok := g.commands[args[0]]
	if !ok {
		fmt.Fprintf(e.stderr, "mantlet %s: unknown subcommand %q\n\n", g.name, args[0])
		g.usage(e.stderr)
		return errUsage
	}
	return c.run(ctx, e, args[1:])
}
