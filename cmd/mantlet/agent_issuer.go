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
	"github.com/mantlet/mantlet/identity/clusterca"
)

// Issuers of 'mantlet agent --issuer'.
const (
	issuerCA        = "ca"
	issuerClusterCA = "cluster-ca"
	issuerSPIRE     = "spire"
)

// issuerFlags choose who signs the node's SVIDs: the CA of --ca-dir (in
// process, identity/ca), the cluster CA service (identity/clusterca) or
// the node's SPIRE agent (identity/spire).
type issuerFlags struct {
	kind        string
	caAddress   string
	caBundle    string
	caTokenFile string
	caServerID  string
	caTimeout   time.Duration

	spireAdmin    string
	spireWorkload string
	spireWait     time.Duration
}

func addIssuerFlags(fs *flag.FlagSet, f *issuerFlags) {
	fs.StringVar(&f.kind, "issuer", issuerCA, "who signs the workloads' SVIDs: ca (the CA of --ca-dir, in process), cluster-ca (the cluster CA service, 'mantlet ca serve', which signs only identities of pods on this node) or spire (the node's SPIRE agent, through its Delegated Identity API)")
	fs.StringVar(&f.caAddress, "ca-address", "", "with --issuer cluster-ca: host:port of the cluster CA service (required)")
	fs.StringVar(&f.caBundle, "ca-bundle", "", "with --issuer cluster-ca: PEM trust bundle that verifies the service (its ConfigMap, mounted; read again when it changes) (required)")
	fs.StringVar(&f.caTokenFile, "token-file", clusterca.DefaultTokenFile, "with --issuer cluster-ca: the agent's projected service-account token for audience "+clusterca.DefaultAudience+" (read for every request)")
	fs.StringVar(&f.caServerID, "ca-server-id", "", "with --issuer cluster-ca: SPIFFE ID the service's certificate must carry (default spiffe://<trust domain>/ns/mantlet-system/sa/mantlet-ca)")
	fs.DurationVar(&f.caTimeout, "ca-timeout", clusterca.DefaultClientTimeout, "with --issuer cluster-ca: bound of one request to the service")
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
		for _, name := range []string{"ca-address", "ca-bundle", "token-file", "ca-server-id", "ca-timeout"} {
			if set[name] {
				return "--" + name + " needs --issuer cluster-ca"
			}
		}
		for _, name := range []string{"spire-admin-socket", "spire-workload-socket", "spire-wait"} {
			if set[name] {
				return "--" + name + " needs --issuer spire"
			}
		}
	case issuerClusterCA:
		switch {
		case f.issuer.caAddress == "" || f.issuer.caBundle == "":
			return "--ca-address and --ca-bundle are required with --issuer cluster-ca"
		case f.caDir != "":
			return "--ca-dir is for --issuer ca; with --issuer cluster-ca, the service keeps the CA's keys"
		case f.issuer.caTimeout <= 0:
			return fmt.Sprintf("--ca-timeout %v: want a positive duration", f.issuer.caTimeout)
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
		return fmt.Sprintf("--issuer %q: want ca, cluster-ca or spire", f.issuer.kind)
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
	switch f.issuer.kind {
	case issuerClusterCA:
		return f.clusterCAIssuer(want, log)
	case issuerSPIRE:
		return f.spireIssuer(ctx, want, log)
	}
	authority, err := ca.OpenDir(f.caDir, ca.Options{}, log.With("component", "ca"))
	if err != nil {
		return nil, want, err
	}
	td := authority.TrustDomain()
	if !want.IsZero() && want != td {
		return nil, want, fmt.Errorf("--trust-domain %s: the CA in %s is for trust domain %s", want, f.caDir, td)
	}
	return authority, td, nil
}

// clusterCAIssuer is the cluster CA's client. The trust domain is
// --trust-domain, or identity's default.
func (f *agentFlags) clusterCAIssuer(td spiffeid.TrustDomain, log *slog.Logger) (identity.Issuer, spiffeid.TrustDomain, error) {
	if td.IsZero() {
		td = identity.DefaultTrustDomain
	}
	server, err := clusterCAServerID(td, f.issuer.caServerID)
	if err != nil {
		return nil, td, err
	}
	c, err := clusterca.NewClient(clusterca.ClientConfig{Addr: f.issuer.caAddress, TrustDomain: td, ServerID: server,
		TokenFile: f.issuer.caTokenFile, BundleFile: f.issuer.caBundle, Timeout: f.issuer.caTimeout})
	if err != nil {
		return nil, td, err
	}
	log.Info("the cluster CA signs the workloads' SVIDs", "address", f.issuer.caAddress, "server_id", server.String(),
		"bundle", f.issuer.caBundle, "token_file", f.issuer.caTokenFile)
	return c, td, nil
}

// clusterCAServerID is --ca-server-id, or the service's default identity
// in td.
func clusterCAServerID(td spiffeid.TrustDomain, flagValue string) (spiffeid.ID, error) {
	if flagValue == "" {
		return spiffeid.FromSegments(td, "ns", "mantlet-system", "sa", "mantlet-ca")
	}
	id, err := spiffeid.FromString(flagValue)
	if err != nil {
		return id, fmt.Errorf("--ca-server-id %q: %w", flagValue, err)
	}
	if !id.MemberOf(td) {
		return id, fmt.Errorf("--ca-server-id %s is not of trust domain %s", id, td)
	}
	return id, nil
}
