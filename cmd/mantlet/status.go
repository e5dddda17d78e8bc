package main

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mantlet/mantlet/admin"
)

func init() {
	register(command{name: "status", summary: "is this node healthy, and why not (asks the local agent)", run: runStatus})
}

func runStatus(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	c, ctx, done, err := cf.connect(ctx, e, "status", "[--admin ADDR | --node N] [-o table|json|yaml]", args, nil)
	if err != nil {
		return err
	}
	defer done()
	st, err := c.Status(ctx)
	if err != nil {
		return explain(err)
	}
	if err := printData(e.stdout, cf.output, st, func(tw *tabwriter.Writer) { statusTable(tw, &st) }); err != nil {
		return err
	}
	if !st.Ready {
		return fmt.Errorf("node %s is not ready: %s", st.Node, st.Reason)
	}
	return nil
}

func statusTable(tw *tabwriter.Writer, st *admin.Status) {
	ready := "yes"
	if !st.Ready {
		ready = "NO"
	}
	node := st.Node
	if st.Version != "" {
		node += " (mantlet " + st.Version + ")"
	}
	fmt.Fprintf(tw, "Node:\t%s\n", node)
	fmt.Fprintf(tw, "Ready:\t%s: %s\n", ready, st.Reason)
	d := st.Datapath
	if d.Available {
		attached := "attached"
		if !d.SkLookupAttached {
			attached = "NOT attached"
		}
		listeners := strings.Join(d.Listeners, ", ")
		if listeners == "" {
			listeners = "none"
		}
		repairs := ""
		if len(d.Repairs) > 0 {
			var parts []string
			for _, f := range slices.Sorted(maps.Keys(d.Repairs)) {
				parts = append(parts, fmt.Sprintf("%s %d", f, d.Repairs[f]))
			}
			repairs = "; repaired since start: " + strings.Join(parts, ", ")
		}
		fmt.Fprintf(tw, "Data path:\tsk_lookup %s; listeners in the SOCKMAP: %s; programs on %d pod veths and %d uplinks%s\n",
			attached, listeners, d.Pods, d.Uplinks, repairs)
	} else {
		fmt.Fprintf(tw, "Data path:\tnone\n")
	}
	s := st.Snapshot
	fmt.Fprintf(tw, "Workloads:\t%d in the cluster, %d on this node (%d enrolled, %d pending); %d services; snapshot generation %d\n",
		s.Workloads, s.LocalWorkloads, s.Enrolled, s.Pending, s.Services, s.Generation)
	if c := st.Config; c.Available {
		state := "in force since " + c.AppliedAt.UTC().Format(time.RFC3339)
		if c.LastEditRejected {
			state = "last edit REJECTED at " + c.RejectedAt.UTC().Format(time.RFC3339) + "; the version of " +
				c.AppliedAt.UTC().Format(time.RFC3339) + " stays in force"
		}
		fmt.Fprintf(tw, "Config:\t%s: %s (%d edits applied, %d rejected)\n", c.File, state, c.Applied, c.Rejected)
	}
	if st.Policy.Available {
		fmt.Fprintf(tw, "Policies:\t%d in force (generation %d)\n", st.Policy.Policies, st.Policy.Generation)
	} else {
		fmt.Fprintf(tw, "Policies:\tno policy engine\n")
	}
	fmt.Fprintf(tw, "Certificates:\t%d identities; %d expiring within %s, %d expired, %d failing to renew\n",
		st.Certs.Identities, len(st.Certs.Expiring), human(admin.ExpiryWarning), len(st.Certs.Expired), len(st.Certs.Failing))
	for _, b := range st.Bundles {
		var roots []string
		for _, r := range b.Roots {
			desc := short(r.Fingerprint) + " (expires " + r.NotAfter.UTC().Format(time.DateOnly)
			if r.Signing {
				desc += ", signing"
			}
			roots = append(roots, desc+")")
		}
		state := ""
		if b.Federated {
			state = fmt.Sprintf("; federated from %s, %s", b.Source, count(int(b.Reloads), "reload"))
		}
		if b.Failures > 0 {
			state += fmt.Sprintf("; %d failed reads, last: %s", b.Failures, b.LastError)
		}
		fmt.Fprintf(tw, "Trust bundle:\t%s: %s: %s%s\n", b.TrustDomain, count(len(b.Roots), "root"), strings.Join(roots, ", "), state)
	}
	fmt.Fprintf(tw, "Flows:\t%d open, %d logged since start\n", st.Flows.Open, st.Flows.Logged)
	if len(st.Problems) > 0 {
		fmt.Fprintf(tw, "\nProblems:\n")
		for _, p := range st.Problems {
			fmt.Fprintf(tw, "  - %s\n", p)
		}
	}
}
