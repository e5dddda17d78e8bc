package node

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/internal/workload"
)

func TestAnAgentRefusesANodeOfAnotherTrustDomain(t *testing.T) {
	a, b := spiffeid.RequireTrustDomainFromString("a.test"), spiffeid.RequireTrustDomainFromString("b.test")
	snap, err := workload.New([]workload.Node{
		{Name: "plain", IP: netip.MustParseAddr("198.18.0.1")},
		{Name: "in-a", IP: netip.MustParseAddr("198.18.0.2"), TrustDomain: a},
		{Name: "in-b", IP: netip.MustParseAddr("198.18.0.3"), TrustDomain: b},
	}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"plain", "in-a"} {
		if err := checkTrustDomain(snap, node, a); err != nil {
			t.Errorf("an agent of a.test on %s: %v", node, err)
		}
	}
	err = checkTrustDomain(snap, "in-b", a)
	want := "node: node in-b is annotated mantlet.io/trust-domain: b.test, but this agent's trust domain is a.test (--trust-domain, or its CA's): run it with a CA of b.test, or fix the annotation"
	if err == nil || err.Error() != want {
		t.Fatalf("an agent of a.test on a node of b.test: %v; want %s", err, want)
	}
}
