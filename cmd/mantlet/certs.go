package main

import (
	"context"
	"flag"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/mantlet/mantlet/admin"
)

func init() {
	register(command{name: "certs", summary: "list this node's workload certificates (identity, serial, expiry, renewal), or with --bundles the trust bundles it verifies peers with", run: runCerts})
}

func runCerts(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	var bundles bool
	c, ctx, done, err := cf.connect(ctx, e, "certs", "[--bundles] [--admin ADDR | --node N] [-o table|json|yaml]", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&bundles, "bundles", false, "list the trust bundles instead: the node's own trust domain's and the federated ones (--federate), with their roots, source file and reloads")
	})
	if err != nil {
		return err
	}
	defer done()
	if bundles {
		st, err := c.Status(ctx)
		if err != nil {
			return explain(err)
		}
		return printBundles(e, cf.output, st.Bundles)
	}
	certs, err := c.Certs(ctx)
	if err != nil {
		return explain(err)
	}
	return printData(e.stdout, cf.output, certs, func(tw *tabwriter.Writer) {
		row(tw, "IDENTITY", "SERIAL", "ROOT", "NOT AFTER", "EXPIRES IN", "STATUS")
		for _, c := range certs {
			row(tw, c.Identity, c.Serial, short(c.Root), notAfter(c), expiresIn(c), certState(c))
		}
	})
}

// printBundles prints trust bundles, one row per root.
func printBundles(e *env, output string, bundles []admin.TrustBundle) error {
	if bundles == nil {
		bundles = []admin.TrustBundle{}
	}
	return printData(e.stdout, output, bundles, func(tw *tabwriter.Writer) {
		row(tw, "TRUST DOMAIN", "SOURCE", "ROOT", "SUBJECT", "NOT AFTER", "CHANGED", "STATUS")
		for _, b := range bundles {
			src := "issuer"
			if b.Federated {
				src = b.Source
			}
			state := "ok"
			if b.Federated && b.Reloads > 0 {
				state = fmt.Sprintf("ok, %s", count(int(b.Reloads), "reload"))
			}
			if b.Failures > 0 {
				state = fmt.Sprintf("%d failed reads (last good bundle in use): %s", b.Failures, b.LastError)
			}
			changed := ""
			if !b.ChangedAt.IsZero() {
				changed = b.ChangedAt.UTC().Format(time.RFC3339)
			}
			if len(b.Roots) == 0 {
				row(tw, b.TrustDomain, src, "", "", "", changed, state)
			}
			for _, r := range b.Roots {
				row(tw, b.TrustDomain, src, short(r.Fingerprint), r.Subject, r.NotAfter.UTC().Format(time.RFC3339), changed, state)
			}
		}
	})
}

func notAfter(c admin.Cert) string {
	if c.NotAfter.IsZero() {
		return ""
	}
	return c.NotAfter.UTC().Format(time.RFC3339)
}

func expiresIn(c admin.Cert) string {
	if c.NotAfter.IsZero() {
		return ""
	}
	return human(time.Duration(c.ExpiresInSeconds * float64(time.Second)))
}

func certState(c admin.Cert) string {
	left := time.Duration(c.ExpiresInSeconds * float64(time.Second))
	switch {
	case c.NotAfter.IsZero() && c.Failures > 0:
		return fmt.Sprintf("NOT ISSUED: %d failed attempts: %s", c.Failures, c.LastError)
	case c.NotAfter.IsZero():
		return "pending"
	case left <= 0:
		return "EXPIRED"
	case c.Failures > 0:
		return fmt.Sprintf("renewal failing (%d attempts): %s", c.Failures, c.LastError)
	case left < admin.WarnWithin(c.NotBefore, c.NotAfter):
		return "expiring soon"
	}
	return "ok"
}

// short abbreviates a fingerprint the way 'mantlet ca rotate' prints it.
func short(fingerprint string) string {
	if len(fingerprint) > 16 {
		return fingerprint[:16]
	}
	return fingerprint
}
