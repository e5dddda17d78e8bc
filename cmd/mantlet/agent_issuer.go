package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/spire"
)

// Issuers of 'mantlet agent --issuer'.
const (
	issuerCA    = "ca"
	issuerSPIRE = "spire"
)

// issuerFlags choose who signs the node's SVIDs: the CA of --ca-dir
// (identity/ca) or the node's SPIRE agent (identity/spire).
type issuerFlags struct {
	kind          string
	spireAdmin    string
	spireWorkload string
	spireWait     time.Duration
}

func addIssuerFlags(fs *flag.FlagSet, f *issuerFlags) {
	fs.StringVar(&f.kind, "issuer", issuerCA, "who signs the workloads' SVIDs: ca (the CA of --ca-dir, in process) or spire (the node's SPIRE agent, through its Delegated Identity API)")
	fs.StringVar(&f.spireAdmin, "spire-admin-socket", "", "with --issuer spire: the SPIRE agent's admin socket (its admin_socket_path), which serves the Delegated Identity API (required)")
	fs.StringVar(&f.spireWorkload, "spire-workload-socket", "", "with --issuer spire: the SPIRE agent's Workload API socket (its socket_path), where the agent fetches its own identity (default $SPIFFE_ENDPOINT_SOCKET)")
	fs.DurationVar(&f.spireWait, "spire-wait", 30*time.Second, "with --issuer spire: how long to wait at start for the SPIRE agent to give the mantlet agent its own identity")
}

// checkIssuer returns what is wrong with the issuer flags (a usage
// error), or "".
func (f *agentFlags) checkIssuer(fs *flag.FlagSet) string {
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	switch f.issuer.kind {
	case issuerCA:
		if f.caDir == "" {
			return "--ca-dir is required"
		}
		for _, name := range []string{"spire-admin-socket", "spire-workload-socket", "spire-wait"} {
			if set[name] {
				return "--" + name + " needs --issuer spire"
			}
		}
	case issuerSPIRE:
		switch {
		case f.issuer.spireAdmin == "":
			return "--spire-admin-socket is required with --issuer spire"
		case f.caDir != "":
			return "--ca-dir is for --issuer ca; with --issuer spire, SPIRE signs the SVIDs"
		case set["svid-ttl"]:
			return "--svid-ttl does not apply with --issuer spire: SPIRE sets the lifetime of its SVIDs (the registration entry's X509-SVID TTL)"
		case f.issuer.spireWait <= 0:
			return fmt.Sprintf("--spire-wait %v: want a positive duration", f.issuer.spireWait)
		}
	default:
		return fmt.Sprintf("--issuer %q: want ca or spire", f.issuer.kind)
	}
	return ""
}

// newIssuer makes the issuer the flags choose and returns it with the
// trust domain of the node's identities. For SPIRE it first asks the
// Workload API for the agent's own identity, which names the trust domain
// (unless --trust-domain does) and the delegate the SPIRE agent must
// authorize. The caller closes an issuer that is an io.Closer.
func (f *agentFlags) newIssuer(ctx context.Context, log *slog.Logger) (identity.Issuer, spiffeid.TrustDomain, error) {
	var want spiffeid.TrustDomain
	if f.trustDomain != "" {
		var err error
		if want, err = spiffeid.TrustDomainFromString(f.trustDomain); err != nil {
			return nil, want, fmt.Errorf("--trust-domain %q: %w", f.trustDomain, err)
		}
	}
	if f.issuer.kind == issuerSPIRE {
		return f.spireIssuer(ctx, want, log)
	}
	authority, err := ca.Load(f.caDir, ca.Options{})
	if err != nil {
		return nil, want, err
	}
	td := authority.TrustDomain()
	if !want.IsZero() && want != td {
		return nil, want, fmt.Errorf("--trust-domain %s: the CA in %s is for trust domain %s", want, f.caDir, td)
	}
	return authority, td, nil
}

func (f *agentFlags) spireIssuer(ctx context.Context, want spiffeid.TrustDomain, log *slog.Logger) (identity.Issuer, spiffeid.TrustDomain, error) {
	wctx, cancel := context.WithTimeout(ctx, f.issuer.spireWait)
	self, err := spire.FetchOwnSVID(wctx, f.issuer.spireWorkload)
	cancel()
	if err != nil {
		return nil, want, err
	}
	td := self.ID.TrustDomain()
	if !want.IsZero() && want != td {
		return nil, want, fmt.Errorf("--trust-domain %s: the SPIRE agent serves trust domain %s (the mantlet agent is %s)", want, td, self.ID)
	}
	log.Info("SPIRE issues the workloads' SVIDs", "delegate", self.ID.String(), "admin_socket", f.issuer.spireAdmin,
		"delegate_expires", self.Certificates[0].NotAfter)
	iss, err := spire.New(f.issuer.spireAdmin, td, spire.Options{Delegate: self.ID, Logger: log.With("component", "spire")})
	if err != nil {
		return nil, td, err
	}
	return iss, td, nil
}
