package spire

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// FetchOwnSVID asks the SPIRE agent's Workload API, at the unix socket
// path socket (or, if socket is empty, at $SPIFFE_ENDPOINT_SOCKET), for
// the calling process's own X509-SVID: the mantlet agent's identity,
// which the SPIRE agent must list in authorized_delegates before it
// serves the Delegated Identity API. Until ctx ends it asks again every
// second while the SPIRE agent is not up yet or has no identity for the
// caller; the error then carries the last answer.
func FetchOwnSVID(ctx context.Context, socket string) (*x509svid.SVID, error) {
	var opts []workloadapi.ClientOption
	where := "$SPIFFE_ENDPOINT_SOCKET"
	if socket != "" {
		where = socket
		opts = append(opts, workloadapi.WithAddr("unix://"+socket))
	}
	for {
		svid, err := workloadapi.FetchX509SVID(ctx, opts...)
		if err == nil {
			return svid, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("spire: the mantlet agent's own SVID from the Workload API at %s: %w"+
				" (is the SPIRE agent running there, and does it have a registration entry for the mantlet agent, such as one with selector unix:uid:0 and the node's SPIRE agent as parent?)", where, err)
		case <-time.After(time.Second):
		}
	}
}
