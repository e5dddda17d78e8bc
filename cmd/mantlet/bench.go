package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mantlet/mantlet/internal/peerbench"
)

func init() {
	register(command{name: "bench", summary: "measure pod-to-pod traffic on the testbed: direct, through mantlet, and through sidecar mTLS pairs (root)", run: runBench})
}

const benchSynopsis = `[--quick] [--rounds 3] [--peers ghostunnel,nginx] [--out DIR] [--profile 10s] [flags]

Builds a two-node testbed with an agent per node and measures, in one run
of interleaved rounds, traffic from a pod of node1 to pods of node2: direct
(unmeshed pods), through mantlet (meshed: eBPF capture, HBONE over mutual
TLS 1.3 between the nodes' agents), and through sidecar-style mutual TLS
pairs of the same shape between the same pods: ghostunnel (built from the
module pinned in test/bench/tools, cached) and nginx stream (installed with
apt-get when missing). A peer that cannot be had is skipped, with the reason.

Figures: throughput with 1 and 4 streams (iperf3, installed with apt-get
when missing); the tunnel's CPU seconds per GB,
per echo round trip and per connection on each side (utime+stime from
/proc); 1-byte echo p50 and p99; new connections per second with 8
clients; the tunnel's RSS at start, before, with and after holding
--idle-conns idle connections. Medians and ranges over the rounds, ratios
round by round, printed and written to --out as bench.json, table.txt and
bench.png. --profile adds perf counts (system calls and context switches
per echo round trip), perf profiles and the agents' Go CPU profiles.
The default run takes 12 to 14 minutes on 2 cores (see docs/performance.md).
Needs root.`

func runBench(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "bench", benchSynopsis)
	opts := peerbench.Options{Stdout: e.stdout, Stderr: e.stderr}
	quick := fs.Bool("quick", false, "a short run (1 round, 1 s phases, 1000 round trips, 200 idle connections, 1 s settle) to check that it works, not for numbers")
	fs.IntVar(&opts.Rounds, "rounds", 3, "how many times each measurement runs, interleaved")
	fs.DurationVar(&opts.Duration, "duration", 10*time.Second, "how long each throughput measurement sends")
	fs.IntVar(&opts.RoundTrips, "round-trips", 10000, "1-byte echo round trips per latency measurement")
	fs.DurationVar(&opts.ConnDuration, "conn-duration", 10*time.Second, "how long each new-connections measurement runs")
	fs.IntVar(&opts.MaxConns, "max-conns", 200000, "at most this many connections per new-connections measurement")
	fs.IntVar(&opts.IdleConns, "idle-conns", 10000, "idle connections held through each tunnel for the memory figures")
	fs.DurationVar(&opts.Settle, "settle", 30*time.Second, "how long after the idle connections close the memory is measured again")
	peers := fs.String("peers", strings.Join(peerbench.Peers, ","), `peers to compare with ("none" for none)`)
	fs.StringVar(&opts.Ghostunnel, "ghostunnel", "", "ghostunnel program to run (default: the one built from test/bench/tools of the repository in the working directory, built if missing)")
	fs.BoolVar(&opts.NoInstall, "no-install", false, "do not install nginx or iperf3 with apt-get when missing (skip nginx; without iperf3 the bench fails)")
	fs.DurationVar(&opts.Profile, "profile", 0, "after the rounds, profile every tunnel for this long per case (1-stream upload, echo loop): perf stat and perf record if perf is installed, the agents' Go CPU profiles from their admin API")
	fs.StringVar(&opts.Out, "out", "", "results folder (default: bench-results/<time>)")
	binary := fs.String("binary", "", "mantlet executable that runs the agents and the app servers (default: this one)")
	serveApp := fs.String("serve-app", "", "serve the bench's application protocol on this address until stopped (what the bench runs in each server pod), and nothing else")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "mantlet bench: unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	if *serveApp != "" {
		return peerbench.ServeApp(ctx, *serveApp, slog.New(slog.NewTextHandler(e.stderr, nil)))
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
		for name, apply := range map[string]func(){
			"rounds":        func() { opts.Rounds = 1 },
			"duration":      func() { opts.Duration = time.Second },
			"round-trips":   func() { opts.RoundTrips = 1000 },
			"conn-duration": func() { opts.ConnDuration = time.Second },
			"idle-conns":    func() { opts.IdleConns = 200 },
			"settle":        func() { opts.Settle = time.Second },
		} {
			if !set[name] {
				apply()
			}
		}
	}
	if opts.Rounds < 1 || opts.Duration <= 0 || opts.ConnDuration <= 0 || opts.RoundTrips < 1 || opts.MaxConns < 1 || opts.IdleConns < 1 || opts.Settle < 0 || opts.Profile < 0 {
		fmt.Fprintln(e.stderr, "mantlet bench: --rounds, the durations, --round-trips, --max-conns and --idle-conns must be positive")
		return errUsage
	}
	if *peers != "none" && *peers != "" {
		for _, p := range strings.Split(*peers, ",") {
			if !slices.Contains(peerbench.Peers, p) {
				fmt.Fprintf(e.stderr, "mantlet bench: unknown peer %q (known: %s)\n", p, strings.Join(peerbench.Peers, ", "))
				return errUsage
			}
			opts.Peers = append(opts.Peers, p)
		}
	}
	if opts.Out == "" {
		opts.Out = filepath.Join("bench-results", time.Now().Format("20060102-150405"))
	}
	bin, err := scenarioBinary("bench", *binary)
	if err != nil {
		return err
	}
	_, err = peerbench.Run(ctx, bin, opts)
	return err
}
