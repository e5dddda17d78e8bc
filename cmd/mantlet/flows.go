package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/telemetry"
)

func init() {
	register(command{name: "flows", summary: "show recent connections through this node with their verdicts (--follow for a live view)", run: runFlows})
}

func runFlows(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	var f telemetry.FlowFilter
	var follow bool
	var last int
	if _, err := cf.parse(e, "flows", "[--follow] [--verdict allowed|denied] [--namespace NS] [--workload NAME] [--last N] [-o table|json|yaml]", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&follow, "follow", false, "keep printing new flows as they happen (Ctrl-C stops)")
		fs.BoolVar(&follow, "f", false, "same as --follow")
		fs.StringVar(&f.Verdict, "verdict", "", "only flows with this policy verdict: allowed or denied")
		fs.StringVar(&f.Namespace, "namespace", "", "only flows from or to this namespace")
		fs.StringVar(&f.Namespace, "n", "", "same as --namespace")
		fs.StringVar(&f.Workload, "workload", "", "only flows from or to this pod (name or namespace/name)")
		fs.StringVar(&f.Event, "event", "close", "open, close, or all")
		fs.IntVar(&last, "last", 20, "how many recent flows to print first (0: all the node keeps)")
	}); err != nil {
		return err
	}
	switch f.Verdict {
	case "", events.Allowed, events.Denied:
	default:
		fmt.Fprintf(e.stderr, "mantlet flows: --verdict %q: want allowed or denied\n", f.Verdict)
		return errUsage
	}
	switch f.Event {
	case "all":
		f.Event = ""
	case events.Open, events.Close:
	default:
		fmt.Fprintf(e.stderr, "mantlet flows: --event %q: want open, close or all\n", f.Event)
		return errUsage
	}
	if !follow {
		c, ctx, done, err := cf.client(ctx, e)
		if err != nil {
			return err
		}
		defer done()
		evs, err := c.Flows(ctx, f, last)
		if err != nil {
			return explain(err)
		}
		return printData(e.stdout, cf.output, evs, func(tw *tabwriter.Writer) {
			flowHeader(tw)
			for i := range evs {
				flowRow(tw, &evs[i])
			}
		})
	}

	// Follow: the stream has no deadline; only connecting is bounded.
	c, _, done, err := cf.client(ctx, e)
	if err != nil {
		return err
	}
	defer done()
	var print func(ev *events.Flow) error
	switch cf.output {
	case "json":
		enc := json.NewEncoder(e.stdout)
		print = func(ev *events.Flow) error { return enc.Encode(ev) }
	case "yaml":
		print = func(ev *events.Flow) error {
			b, err := yaml.Marshal(ev)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(e.stdout, "---\n%s", b)
			return err
		}
	default:
		// Columns of fixed width: rows arrive one at a time.
		fmt.Fprintf(e.stdout, flowFormat, "TIME", "DIR", "SOURCE", "DESTINATION", "VERDICT", "FLAG", "BYTES →/←", "POLICY")
		print = func(ev *events.Flow) error {
			_, err := fmt.Fprintf(e.stdout, flowFormat, flowCols(ev)...)
			return err
		}
	}
	err = c.Follow(ctx, f, last, func(ev events.Flow) error { return print(&ev) },
		func(n uint64) {
			fmt.Fprintf(e.stderr, "mantlet flows: %d flows not shown: the stream fell behind\n", n)
		})
	if err != nil {
		return explain(err)
	}
	return nil
}

const flowFormat = "%-12s %-8s %-40s %-48s %-8s %-16s %-18s %s\n"

func flowHeader(tw io.Writer) {
	row(tw, "TIME", "DIR", "SOURCE", "DESTINATION", "VERDICT", "FLAG", "BYTES →/←", "POLICY")
}

func flowRow(tw io.Writer, ev *events.Flow) {
	row(tw, flowCols(ev)...)
}

func flowCols(ev *events.Flow) []any {
	dir := ev.Direction
	switch dir {
	case "outbound":
		dir = "out"
	case "inbound":
		dir = "in"
	case "inbound_plaintext":
		dir = "in-plain"
	}
	if ev.Event == events.Open {
		dir += "+"
	}
	policy := ev.Policy
	if policy != "" {
		policy = fmt.Sprintf("%s[%d]", policy, ev.Rule)
	}
	verdict := ev.Verdict
	if verdict == "" {
		verdict = "-"
	}
	return []any{ev.Time.UTC().Format("15:04:05.000"), dir, endpoint(ev.Src, false), endpoint(ev.Dst, true), verdict,
		ev.ResponseFlag, bytesHuman(ev.BytesSent) + "/" + bytesHuman(ev.BytesReceived), orDash(policy)}
}

// endpoint names one end: namespace/pod (address), the service for a
// destination reached through one.
func endpoint(ep events.Endpoint, dst bool) string {
	var b strings.Builder
	if ep.Workload != "" {
		b.WriteString(ep.Namespace + "/" + ep.Workload + " ")
	}
	if ep.Addr.IsValid() {
		b.WriteString(ep.Addr.String())
	}
	if dst && ep.Service != "" {
		b.WriteString(" via " + strings.TrimSuffix(ep.Service, ".svc.cluster.local"))
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
