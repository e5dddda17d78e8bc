package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"github.com/mantlet/mantlet/admin"
)

// adminEnv is the environment variable that sets the default admin
// address of the operator commands.
const adminEnv = "MANTLET_ADMIN"

// clientFlags are the flags every operator command shares: where the admin
// API is and how to print.
type clientFlags struct {
	admin   string
	node    string
	output  string
	timeout time.Duration
}

// addClientFlags registers --admin, --node, -o/--output and --timeout.
func addClientFlags(fs *flag.FlagSet, f *clientFlags) {
	fs.StringVar(&f.admin, "admin", "", "admin API of the node: host:port, or a unix socket path (default $"+adminEnv+", else the --node socket, else "+admin.DefaultAddr+")")
	fs.StringVar(&f.node, "node", "", "talk to this node's agent through its unix socket ("+admin.SocketPath("<node>")+")")
	fs.StringVar(&f.output, "o", "table", "output format: table, json or yaml")
	fs.StringVar(&f.output, "output", "table", "same as -o")
	fs.DurationVar(&f.timeout, "timeout", 10*time.Second, "how long to wait for the admin API")
}

// validate checks the shared flags; it prints the problem and the usage.
func (f *clientFlags) validate(e *env, fs *flag.FlagSet) error {
	switch f.output {
	case "table", "json", "yaml":
	default:
		fmt.Fprintf(e.stderr, "%s: -o %q: want table, json or yaml\n", fs.Name(), f.output)
		fs.Usage()
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "%s: unexpected arguments %q\n", fs.Name(), fs.Args())
		fs.Usage()
		return errUsage
	}
	return nil
}

// parse makes the flag set of the operator command name with the client
// flags and those extra adds (extra may be nil), parses args and checks
// the shared flags.
func (f *clientFlags) parse(e *env, name, synopsis string, args []string, extra func(fs *flag.FlagSet)) (*flag.FlagSet, error) {
	fs := newFlagSet(e, name, synopsis)
	addClientFlags(fs, f)
	if extra != nil {
		extra(fs)
	}
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if err := f.validate(e, fs); err != nil {
		return nil, err
	}
	return fs, nil
}

// connect is parse then client, for an operator command that needs no
// checks of its own: the caller defers done.
func (f *clientFlags) connect(ctx context.Context, e *env, name, synopsis string, args []string, extra func(fs *flag.FlagSet)) (c *admin.Client, cctx context.Context, done context.CancelFunc, err error) {
	if _, err := f.parse(e, name, synopsis, args, extra); err != nil {
		return nil, nil, nil, err
	}
	return f.client(ctx, e)
}

// addr is the admin address to use.
func (f *clientFlags) addr(e *env) string {
	switch {
	case f.admin != "":
		return f.admin
	case f.node != "":
		return admin.SocketPath(f.node)
	case e.getenv(adminEnv) != "":
		return e.getenv(adminEnv)
	}
	return admin.DefaultAddr
}

// client returns a client of the admin API and a context bounded by
// --timeout.
func (f *clientFlags) client(ctx context.Context, e *env) (*admin.Client, context.Context, context.CancelFunc, error) {
	c, err := admin.NewClient(f.addr(e))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--admin: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	return c, ctx, func() { cancel(); c.Close() }, nil
}

// explain adds what to do next to an error of the admin client.
func explain(err error) error {
	var ue *admin.UnreachableError
	if errors.As(err, &ue) {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%w\nThe agent's admin socket is root's: run this command as root", err)
		}
		hint := "Is 'mantlet agent' running on this node? Point at it with --admin host:port, --admin /path/to/admin.sock or --node <name>"
		// Named by --node: say which nodes have agents here (--node takes
		// the pin dir's name, which may differ from the node's).
		if ok, _ := filepath.Match(admin.SocketPath("*"), ue.Addr); ok {
			if socks, _ := filepath.Glob(admin.SocketPath("*")); len(socks) > 0 {
				hint += "; agents' sockets here: " + strings.Join(socks, ", ")
			}
		}
		return fmt.Errorf("%w\n%s", err, hint)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("the admin API did not answer in time (--timeout): %w", err)
	}
	return err
}
