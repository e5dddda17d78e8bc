package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/mantlet/mantlet/admin"
)

func init() {
	register(command{name: "certs", summary: "list this node's workload certificates (identity, serial, expiry, renewal)", run: runCerts})
}

func runCerts(ctx context.Context, e *env, args []string) error {
	var cf clientFlags
	c, ctx, done, err := cf.connect(ctx, e, "certs", "[--admin ADDR | --node N] [-o table|json|yaml]", args, nil)
	if err != nil {
		return err
	}
	defer done()
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
