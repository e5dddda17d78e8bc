package main

import (
	"context"
	"flag"
	"strings"
	"text/tabwriter"
)

func init() {
	register(command{name: "workloads", summary: "list the workloads the local agent knows, with their identity and enrollment", run: runWorkloads})
}

func runWorkloads(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	var ns string
	var local bool
	c, ctx, done, err := cf.connect(ctx, e, "workloads", "[-n NAMESPACE] [--local] [--admin ADDR | --node N] [-o table|json|yaml]", args, func(fs *flag.FlagSet) {
		fs.StringVar(&ns, "n", "", "only workloads of this namespace")
		fs.StringVar(&ns, "namespace", "", "same as -n")
		fs.BoolVar(&local, "local", false, "only workloads of this node")
	})
	if err != nil {
		return err
	}
	defer done()
	ws, err := c.Workloads(ctx, ns)
	if err != nil {
		return explain(err)
	}
	if local {
		kept := ws[:0]
		for _, w := range ws {
			if w.Local {
				kept = append(kept, w)
			}
		}
		ws = kept
	}
	return printData(e.stdout, cf.output, ws, func(tw *tabwriter.Writer) {
		row(tw, "NAMESPACE", "NAME", "IP", "NODE", "IDENTITY", "MESH", "STATE", "MTLS")
		for _, w := range ws {
			mesh := "no"
			if w.Enrolled {
				mesh = "yes"
			}
			state := w.State
			if w.Error != "" {
				state += " (" + w.Error + ")"
			}
			row(tw, w.Namespace, w.Name, strings.Join(w.IPs, ","), w.Node, w.Identity, mesh, state, w.MTLSMode)
		}
	})
}
