package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	"github.com/mantlet/mantlet/internal/scenario"
)

func init() {
	register(command{name: "bench", summary: "measure pod-to-pod traffic on the testbed, direct vs through mantlet (root)", run: runBench})
}

const benchSynopsis = `[--quick] [--duration 15s] [--round-trips 10000] [--conn-duration 15s] [flags]

Builds a two-node testbed with an agent per node and measures, in the same
run, traffic from a pod of node1 to a pod of node2 in two ways: direct (the
pods' namespace is not meshed) and through mantlet (meshed: eBPF capture,
HBONE over mutual TLS 1.3 between the nodes' ztunnels). It prints a table:
throughput of one stream, 1-byte echo latency p50 and p99 on one connection,
new connections per second (connect, 1 byte each way, close), and the
ztunnels' CPU seconds per GB moved (both agents' utime+stime from /proc
during the throughput phase). The traffic is made in Go inside the pods'
network namespaces. The default run takes about a minute. Needs root.`

func runBench(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "bench", benchSynopsis)
	opts := scenario.BenchOptions{Stdout: e.stdout, Stderr: e.stderr}
	quick := fs.Bool("quick", false, "a short run (1 s phases, 1000 round trips) to check that it works, not for numbers")
	fs.DurationVar(&opts.Duration, "duration", 15*time.Second, "how long each throughput measurement sends")
	fs.IntVar(&opts.RoundTrips, "round-trips", 10000, "1-byte echo round trips per latency measurement")
	fs.DurationVar(&opts.ConnDuration, "conn-duration", 15*time.Second, "how long each new-connections measurement runs")
	fs.IntVar(&opts.MaxConns, "max-conns", 200000, "at most this many connections per new-connections measurement")
	binary := fs.String("binary", "", "mantlet executable that runs the agents (default: this one)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet bench: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
		if !set["duration"] {
			opts.Duration = time.Second
		}
		if !set["round-trips"] {
			opts.RoundTrips = 1000
		}
		if !set["conn-duration"] {
			opts.ConnDuration = time.Second
		}
	}
	if opts.Duration <= 0 || opts.ConnDuration <= 0 || opts.RoundTrips < 1 || opts.MaxConns < 1 {
		fmt.Fprintln(e.stderr, "mantlet bench: durations, --round-trips and --max-conns must be positive")
		return errUsage
	}
	bin, err := scenarioBinary("bench", *binary)
	if err != nil {
		return err
	}
	return scenario.Bench(ctx, bin, opts)
}
