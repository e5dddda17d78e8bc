package ztunnel_test

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
)

// federate returns the bundles of a node whose CA is own, given other's
// bundle as a federated file (as 'mantlet agent --federate' reads it).
func federate(t testing.TB, own, other *ztest.CA) x509bundle.Source {
	t.Helper()
	b, err := other.Bundle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pem, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), other.TrustDomain().Name()+".pem")
	if err := os.WriteFile(file, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	fed, err := identity.NewFederation(own.TrustDomain(), []identity.FederatedBundle{{TrustDomain: other.TrustDomain(), File: file}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return identity.TrustBundles(own.TrustDomain(), own.Bundles(), fed)
}

// TestFederatedTrustDomainsTalk runs node-a in trust domain a.test and
// node-b in b.test, two CAs that signed nothing of each other, each
// ztunnel given the other's bundle: connections both ways are meshed,
// each side presenting its own domain's SVID and seeing the other's.
func TestFederatedTrustDomainsTalk(t *testing.T) {
	m := newMesh(t, meshOpts{federated: true})
	a, b := m.nodes["node-a"], m.nodes["node-b"]
	frontend, checkoutB := m.ca.ID("shop", "frontend"), m.caB.ID("shop", "checkout")
	if got := roundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("a to b")); string(got) != "a to b" {
		t.Fatalf("echo = %q", got)
	}
	out, in := a.flow(t), b.flow(t)
	if out.Flag != ztunnel.FlagNone || out.Path != ztunnel.PathHBONE || out.SrcID != frontend || out.DstID != checkoutB {
		t.Fatalf("node-a's flow: %s %s -> %s flag %s (%v); want HBONE %s -> %s", out.Path, out.SrcID, out.DstID, out.Flag, out.Err, frontend, checkoutB)
	}
	if in.Flag != ztunnel.FlagNone || in.SrcID != frontend || in.DstID != checkoutB || in.SrcWorkload == nil || in.SrcWorkload.Name != "frontend-0" {
		t.Fatalf("node-b's flow: %s (%v) -> %s flag %s (%v); want %s (frontend-0) -> %s", in.SrcID, in.SrcWorkload, in.DstID, in.Flag, in.Err, frontend, checkoutB)
	}

	if got := roundTrip(t, m.mustDial(ipB2, m.appAddr(ipA2)), []byte("b to a")); string(got) != "b to a" {
		t.Fatalf("echo = %q", got)
	}
	if in := a.flow(t); in.Flag != ztunnel.FlagNone || in.SrcID != m.caB.ID("shop", "admin") || in.DstID != m.ca.ID("shop", "checkout") {
		t.Fatalf("node-a's inbound flow: %s -> %s flag %s (%v)", in.SrcID, in.DstID, in.Flag, in.Err)
	}
}

// TestUnfederatedTrustDomainIsRefused gives node-b no bundle of a.test: a
// client of a.test is refused during the handshake, counted as
// tls_untrusted_domain, with an error naming the domain.
func TestUnfederatedTrustDomainIsRefused(t *testing.T) {
	m := newMesh(t, meshOpts{federated: true, unfederated: map[string]bool{"node-b": true}})
	b := m.nodes["node-b"]
	before := b.p.Rejected(ztunnel.FlagTLSUntrustedDomain)
	if got := closedRoundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("secret")); len(got) != 0 {
		t.Fatalf("the client got %q through a server that does not trust its domain", got)
	}
	b.waitCount(t, ztunnel.FlagTLSUntrustedDomain, before+1)
	r := m.nodes["node-a"].flow(t)
	if r.Flag == ztunnel.FlagNone {
		t.Fatalf("node-a's flow ended without a refusal: %+v", r)
	}
}

// TestOneDomainsCANeverVouchForAnother makes each CA mint an identity of
// the other's domain: node-a's client presents spiffe://b.test/... signed
// by a.test's CA, node-b's server spiffe://a.test/... signed by b.test's.
// Both are refused as signed by an unknown authority although each node
// trusts both CAs, each for its own domain.
func TestOneDomainsCANeverVouchForAnother(t *testing.T) {
	t.Run("a client of b.test signed by a.test's CA", func(t *testing.T) {
		var m *mesh
		m = newMesh(t, meshOpts{federated: true, svids: map[string]ztunnel.SVIDSource{
			"node-a": svidFunc(func(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
				return m.ca.MintAny(spiffeid.RequireFromString("spiffe://b.test"+id.Path()), time.Hour)
			}),
		}})
		b := m.nodes["node-b"]
		before := b.p.Rejected(ztunnel.FlagTLSUnknownCA)
		if got := closedRoundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("secret")); len(got) != 0 {
			t.Fatalf("the client got %q", got)
		}
		b.waitCount(t, ztunnel.FlagTLSUnknownCA, before+1)
	})
	t.Run("a server of a.test signed by b.test's CA", func(t *testing.T) {
		var m *mesh
		m = newMesh(t, meshOpts{federated: true, svids: map[string]ztunnel.SVIDSource{
			"node-b": svidFunc(func(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
				return m.caB.MintAny(spiffeid.RequireFromString("spiffe://a.test"+id.Path()), time.Hour)
			}),
		}})
		if got := closedRoundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("secret")); len(got) != 0 {
			t.Fatalf("the client got %q from an impostor", got)
		}
		r := m.nodes["node-a"].flow(t)
		if r.Flag != ztunnel.FlagTLSUnknownCA || !errors.Is(r.Err, hbone.ErrUnknownAuthority) || !strings.Contains(r.Err.Error(), "spiffe://a.test/ns/shop/sa/checkout") {
			t.Fatalf("node-a's flow: flag %s err %v; want %s naming the presented ID", r.Flag, r.Err, ztunnel.FlagTLSUnknownCA)
		}
	})
}

// TestKeyExchangeMismatchIsRefusedAndCounted: a node that accepts only the
// post-quantum hybrid refuses a peer that offers only X25519 (a failed
// handshake, counted, nothing through); with the defaults both agree on
// the hybrid and count it on their side.
func TestKeyExchangeMismatchIsRefusedAndCounted(t *testing.T) {
	t.Run("hybrid only against X25519 only", func(t *testing.T) {
		m := newMesh(t, meshOpts{keyExchange: map[string]hbone.KeyExchange{
			"node-a": {tls.X25519}, "node-b": {tls.X25519MLKEM768},
		}})
		b := m.nodes["node-b"]
		before := b.p.Rejected(ztunnel.FlagTLSHandshake)
		if got := closedRoundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("secret")); len(got) != 0 {
			t.Fatalf("the client got %q through a handshake with no key exchange in common", got)
		}
		b.waitCount(t, ztunnel.FlagTLSHandshake, before+1)
		if r := m.nodes["node-a"].flow(t); r.Flag == ztunnel.FlagNone {
			t.Fatalf("node-a's flow ended without a refusal: %+v", r)
		}
		if n := b.p.ServerKeyExchanges(); len(n) != 0 {
			t.Errorf("node-b counted accepted handshakes %v, want none", n)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		m := newMesh(t, meshOpts{})
		if got := roundTrip(t, m.mustDial(ipA1, m.appAddr(ipB1)), []byte("ping")); string(got) != "ping" {
			t.Fatalf("echo through the tunnel: %q", got)
		}
		if n := m.nodes["node-a"].p.PoolStats().KeyExchanges; n["X25519MLKEM768"] != 1 || len(n) != 1 {
			t.Errorf("node-a's pool counted %v, want one X25519MLKEM768 handshake", n)
		}
		if n := m.nodes["node-b"].p.ServerKeyExchanges(); n["X25519MLKEM768"] != 1 || len(n) != 1 {
			t.Errorf("node-b counted %v, want one X25519MLKEM768 handshake", n)
		}
	})
}
