package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/mantlet/mantlet/admin"
)

func init() {
	register(command{name: "policy", summary: "ask the local agent's policy engine about a connection", run: runPolicy})
}

// policyCommands are the subcommands of 'mantlet policy'; other files may
// add theirs from init.
var policyCommands = map[string]subcommand{
	"check": {"evaluate a connection with the live policies: verdict, deciding policy and rule", runPolicyCheck},
}

func runPolicy(ctx context.Context, e *env, args []string) error {
	return group{name: "policy", commands: policyCommands}.run(ctx, e, args)
}

func runPolicyCheck(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	var from, to string
	var port uint
	fs, err := cf.parse(e, "policy check", "--from <ns/sa | SPIFFE ID | IP> --to <ns/workload | ns/service | ip:port> [--port N]", args, func(fs *flag.FlagSet) {
		fs.StringVar(&from, "from", "", "the source: namespace/serviceaccount, a SPIFFE ID, or a pod IP (an unmeshed IP is a plaintext source)")
		fs.StringVar(&to, "to", "", "the destination: namespace/workload, namespace/service, ip:port, or an IP with --port")
		fs.UintVar(&port, "port", 0, "the destination port (when --to has none); a service port is mapped to its target port")
	})
	if err != nil {
		return err
	}
	if from == "" || to == "" || port > 65535 {
		fmt.Fprintf(e.stderr, "mantlet policy check: --from and --to are required (and --port must be 1-65535)\n")
		fs.Usage()
		return errUsage
	}
	c, ctx, done, err := cf.client(ctx, e)
	if err != nil {
		return err
	}
	defer done()
	res, err := c.Check(ctx, from, to, uint16(port))
	if err != nil {
		return explain(err)
	}
	return printData(e.stdout, cf.output, res, func(tw *tabwriter.Writer) { checkTable(tw, &res) })
}

func checkTable(tw *tabwriter.Writer, r *admin.Check) {
	fmt.Fprintf(tw, "Verdict:\t%s (%s)\n", strings.ToUpper(r.Verdict), r.Reason)
	fmt.Fprintf(tw, "Why:\t%s\n", r.Message)
	if r.Policy != "" {
		if r.Rule >= 0 {
			fmt.Fprintf(tw, "Policy:\t%s, rule %d (%s)\n", r.Policy, r.Rule, strings.ToUpper(r.Action))
		} else {
			fmt.Fprintf(tw, "Policy:\t%s\n", r.Policy)
		}
	} else {
		fmt.Fprintf(tw, "Policy:\tnone\n")
	}
	if len(r.RuleSpec) > 0 {
		fmt.Fprintf(tw, "Rule:\t%s\n", compactJSON(r.RuleSpec))
	}
	src := r.Source.Identity
	if src == "" {
		src = "plaintext from " + r.Source.IP
	} else if r.Source.IP != "" {
		src += " at " + r.Source.IP
	}
	if r.Source.Workload != "" {
		src += " (" + r.Source.Workload + ")"
	}
	fmt.Fprintf(tw, "Source:\t%s\n", src)
	var dst string
	switch {
	case r.Destination.Meshed:
		dst = fmt.Sprintf("%s (%s) at %s:%d, mTLS mode %s", r.Destination.Workload, r.Destination.Identity,
			r.Destination.IP, r.Destination.Port, r.Destination.MTLSMode)
	default:
		dst = fmt.Sprintf("%s:%d, not in the mesh", r.Destination.IP, r.Destination.Port)
	}
	if r.Destination.Service != "" {
		dst += ", through service " + r.Destination.Service
	}
	fmt.Fprintf(tw, "Destination:\t%s\n", dst)
	for _, a := range r.Audit {
		fmt.Fprintf(tw, "Audit:\trule %d of AUDIT policy %s would have denied this connection\n", a.Rule, a.Policy)
	}
	fmt.Fprintf(tw, "Policy set:\tgeneration %d\n", r.Generation)
}

// compactJSON prints raw JSON on one line.
func compactJSON(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return string(b)
	}
	return buf.String()
}
