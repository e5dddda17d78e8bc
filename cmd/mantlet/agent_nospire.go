//go:build !spire

package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
)

// spireBuilt is false in a default build: the SPIRE issuer needs gRPC,
// whose code alone costs every agent about 12 MiB of resident memory
// (measured: 29 against 41 MiB at start), SPIRE users or not. Build with
// -tags spire (make build TAGS=spire, make image TAGS=spire) to link it.
const spireBuilt = false

// errNoSPIRE says how to get a mantlet that speaks to SPIRE.
var errNoSPIRE = errors.New("--issuer spire: this mantlet was built without SPIRE support; build it with -tags spire (make build TAGS=spire, make image TAGS=spire)")

func (f *agentFlags) spireIssuer(_ context.Context, want spiffeid.TrustDomain, _ *slog.Logger) (identity.Issuer, spiffeid.TrustDomain, error) {
	return nil, want, errNoSPIRE
}
