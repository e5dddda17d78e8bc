package identity_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
)

func TestParseWorkloadID(t *testing.T) {
	for _, tc := range []struct {
		in           string
		wantNS       string
		wantSA       string
		wantNotWID   bool   // a SPIFFE ID, but not of a workload
		wantErrMatch string // otherwise: not a SPIFFE ID at all
	}{
		{in: "spiffe://cluster.local/ns/shop/sa/cart", wantNS: "shop", wantSA: "cart"},
		{in: "spiffe://example.org/ns/kube-system/sa/default", wantNS: "kube-system", wantSA: "default"},
		{in: "spiffe://td/ns/a.b/sa/c_d-e", wantNS: "a.b", wantSA: "c_d-e"},
		{in: "spiffe://cluster.local", wantNotWID: true},
		{in: "spiffe://cluster.local/ns/shop", wantNotWID: true},
		{in: "spiffe://cluster.local/ns/shop/sa", wantNotWID: true},
		{in: "spiffe://cluster.local/ns/shop/sa/cart/extra", wantNotWID: true},
		{in: "spiffe://cluster.local/sa/cart/ns/shop", wantNotWID: true},
		{in: "spiffe://cluster.local/namespace/shop/sa/cart", wantNotWID: true},
		{in: "", wantErrMatch: "cannot be empty"},
		{in: "https://cluster.local/ns/shop/sa/cart", wantErrMatch: "scheme is missing or invalid"},
		{in: "spiffe://Cluster.local/ns/shop/sa/cart", wantErrMatch: "trust domain characters"},
		{in: "spiffe://cluster.local/ns//sa/cart", wantErrMatch: "path cannot contain empty segments"},
		{in: "spiffe://cluster.local/ns/../sa/cart", wantErrMatch: "dot segments"},
		{in: "spiffe://cluster.local/ns/shop/sa/cart/", wantErrMatch: "trailing slash"},
		{in: "spiffe://cluster.local/ns/sh%20op/sa/cart", wantErrMatch: "path segment characters"},
		{in: "spiffe://user@cluster.local/ns/shop/sa/cart", wantErrMatch: "trust domain characters"},
		{in: "spiffe://cluster.local:8080/ns/shop/sa/cart", wantErrMatch: "trust domain characters"},
		{in: "spiffe://cluster.local/ns/shop/sa/cart?x=1", wantErrMatch: "path segment characters"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			id, ns, sa, err := parse(tc.in)
			switch {
			case tc.wantNotWID:
				if !errors.Is(err, identity.ErrNotWorkloadID) {
					t.Fatalf("ParseWorkloadID(%q) = %v, want ErrNotWorkloadID", tc.in, err)
				}
			case tc.wantErrMatch != "":
				if err == nil || errors.Is(err, identity.ErrNotWorkloadID) || !strings.Contains(err.Error(), tc.wantErrMatch) {
					t.Fatalf("ParseWorkloadID(%q) = %v, want a parse error containing %q", tc.in, err, tc.wantErrMatch)
				}
			default:
				if err != nil {
					t.Fatal(err)
				}
				if ns != tc.wantNS || sa != tc.wantSA || id.String() != tc.in {
					t.Fatalf("ParseWorkloadID(%q) = %s, %q, %q", tc.in, id, ns, sa)
				}
			}
		})
	}
}

// parse is what a caller with a string does: spiffeid.FromString, then
// ParseWorkloadID.
func parse(s string) (spiffeid.ID, string, string, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, "", "", err
	}
	ns, sa, err := identity.ParseWorkloadID(id)
	return id, ns, sa, err
}

func TestParseWorkloadIDDoesNotAllocate(t *testing.T) {
	ids := []spiffeid.ID{
		spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart"),
		spiffeid.RequireFromString("spiffe://cluster.local/vm/db"),
		{},
	}
	for _, id := range ids {
		if n := testing.AllocsPerRun(100, func() { _, _, _ = identity.ParseWorkloadID(id) }); n != 0 {
			t.Errorf("ParseWorkloadID(%q) allocates %v times", id, n)
		}
	}
}

func TestWorkloadID(t *testing.T) {
	id, err := identity.WorkloadID(td, "shop", "cart")
	if err != nil || id.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Fatalf("WorkloadID = %s, %v", id, err)
	}
	for _, bad := range [][2]string{{"", "cart"}, {"shop", ""}, {"a/b", "cart"}, {"shop", ".."}} {
		if id, err := identity.WorkloadID(td, bad[0], bad[1]); err == nil {
			t.Errorf("WorkloadID(ns %q, sa %q) = %s, want an error", bad[0], bad[1], id)
		}
	}
}

// FuzzParseWorkloadID checks that whatever ParseWorkloadID accepts of a
// parsed SPIFFE ID is a canonical workload ID that round-trips through
// WorkloadID, and that a valid SPIFFE ID it refuses is refused with
// ErrNotWorkloadID.
func FuzzParseWorkloadID(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/shop/sa/cart",
		"spiffe://cluster.local/ns/shop/sa",
		"spiffe://cluster.local",
		"spiffe://a/ns/b/sa/c/d",
		"spiffe://cluster.local/ns/../sa/x",
		"SPIFFE://cluster.local/ns/a/sa/b",
		"spiffe://cluster.local/ns/a%2Fb/sa/c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := spiffeid.FromString(s)
		if err != nil {
			return
		}
		ns, sa, err := identity.ParseWorkloadID(id)
		if err != nil {
			if !errors.Is(err, identity.ErrNotWorkloadID) {
				t.Fatalf("a valid SPIFFE ID %q failed with %v, want ErrNotWorkloadID", s, err)
			}
			return
		}
		if id.String() != s {
			t.Fatalf("parsed %q as %q", s, id)
		}
		if ns == "" || sa == "" || strings.Contains(ns+sa, "/") {
			t.Fatalf("%q: ns %q sa %q", s, ns, sa)
		}
		back, err := identity.WorkloadID(id.TrustDomain(), ns, sa)
		if err != nil || back != id {
			t.Fatalf("WorkloadID(%s, %q, %q) = %s, %v; want %s", id.TrustDomain(), ns, sa, back, err, id)
		}
	})
}
