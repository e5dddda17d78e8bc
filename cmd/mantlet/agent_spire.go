//go:build spire

package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/spire"
)

// spireBuilt is true in a mantlet built with -tags spire, which links the
// SPIRE issuer (and its gRPC client).
const spireBuilt = true

// spireIssuer is SPIRE's Delegated Identity API client. It first asks the
// Workload API for the agent's own identity, which names the trust domain
// and the delegate the SPIRE agent must authorize.
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
