package spiretest_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/spire"
	"github.com/mantlet/mantlet/internal/spiretest"
)

// freeLoopback returns a free TCP port on 127.0.0.1 for the server.
func freeLoopback(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// TestTheDelegatedIdentityAPIServesRegisteredWorkloads runs a SPIRE server
// and one agent on the loopback (no namespaces, no root) and uses them as
// mantlet's agent does: its own identity from the Workload API, then the
// SVID of a workload by k8s:ns and k8s:sa through the Delegated Identity
// API, verified against the server's bundle.
func TestTheDelegatedIdentityAPIServesRegisteredWorkloads(t *testing.T) {
	bins := spiretest.RequireBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	srv, err := spiretest.Start(ctx, spiretest.Options{Binaries: &bins, Listen: freeLoopback(t), Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("SPIRE logs:\n%s", srv.Logs(60))
		}
		if err := srv.Stop(); err != nil {
			t.Error(err)
		}
	})
	td := srv.TrustDomain()
	delegate := spiffeid.RequireFromPath(td, "/tests/delegate")
	agent, err := srv.StartAgent(ctx, "node1", spiretest.AgentOptions{AuthorizedDelegates: []spiffeid.ID{delegate}})
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		t.Fatal(err)
	}
	cart := spiffeid.RequireFromPath(td, "/ns/shop/sa/cart")
	for _, e := range []spiretest.Entry{
		{ID: delegate, Parent: agent.ID, Selectors: []string{fmt.Sprintf("unix:uid:%d", os.Getuid()), "unix:path:" + exe}},
		{ID: cart, Parent: agent.ID, Selectors: []string{"k8s:ns:shop", "k8s:sa:cart"}, X509SVIDTTL: time.Minute},
	} {
		if err := srv.CreateEntry(ctx, e); err != nil {
			t.Fatal(err)
		}
	}

	// The agent learns of the entries at its next sync.
	self, err := spire.FetchOwnSVID(ctx, agent.WorkloadSocket)
	if err != nil {
		t.Fatal(err)
	}
	if self.ID != delegate {
		t.Fatalf("own SVID names %s, want %s", self.ID, delegate)
	}
	iss, err := spire.New(agent.AdminSocket, td, spire.Options{Delegate: self.ID, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer iss.Close()
	var svid *x509svid.SVID
	for {
		if svid, err = iss.FetchSVID(ctx, cart); err == nil || !errors.Is(err, spire.ErrNotRegistered) {
			break
		}
		time.Sleep(200 * time.Millisecond) // the entry is not synced yet
	}
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := srv.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil || got != cart {
		t.Errorf("the workload's SVID: %v, %v; want %s verified by the server's bundle", got, err, cart)
	}
	if life := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); life != time.Minute+10*time.Second {
		t.Errorf("the SVID lives %v, want the entry's minute and SPIRE's 10 s of backdating", life)
	}
	b, err := iss.Bundle(ctx)
	if err != nil || !b.Equal(bundle) {
		t.Errorf("the Delegated Identity API's bundle: %v, %v; want the server's", b, err)
	}

	// Through the identity manager, as the node runs it.
	m := identity.NewManager(iss, td, log, identity.ManagerOptions{})
	got, err := m.SVID(ctx, cart)
	if err != nil || !got.Certificates[0].Equal(svid.Certificates[0]) {
		t.Errorf("the Manager's SVID: %v; want SPIRE's", err)
	}

	// A workload nobody registered.
	if _, err := iss.FetchSVID(ctx, spiffeid.RequireFromPath(td, "/ns/shop/sa/stranger")); !errors.Is(err, spire.ErrNotRegistered) ||
		!strings.Contains(err.Error(), "selectors k8s:ns:shop, k8s:sa:stranger") {
		t.Errorf("an unregistered identity: %v, want ErrNotRegistered naming its selectors", err)
	}
}

// TestSPIREComesBackOnItsData kills the SPIRE agent and server, as in an
// outage, and starts them again: the agent needs no new join token, the
// server keeps its CA (the bundle does not change) and its entries, and a
// delegate that kept the SVID it had through the outage gets a new one
// from the restarted agent.
func TestSPIREComesBackOnItsData(t *testing.T) {
	bins := spiretest.RequireBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	srv, err := spiretest.Start(ctx, spiretest.Options{Binaries: &bins, Listen: freeLoopback(t), Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("SPIRE logs:\n%s", srv.Logs(60))
		}
		if err := srv.Stop(); err != nil {
			t.Error(err)
		}
	})
	td := srv.TrustDomain()
	delegate := spiffeid.RequireFromPath(td, "/tests/delegate")
	agent, err := srv.StartAgent(ctx, "node1", spiretest.AgentOptions{AuthorizedDelegates: []spiffeid.ID{delegate}})
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		t.Fatal(err)
	}
	cart := spiffeid.RequireFromPath(td, "/ns/shop/sa/cart")
	for _, e := range []spiretest.Entry{
		{ID: delegate, Parent: agent.ID, Selectors: []string{fmt.Sprintf("unix:uid:%d", os.Getuid()), "unix:path:" + exe}},
		{ID: cart, Parent: agent.ID, Selectors: []string{"k8s:ns:shop", "k8s:sa:cart"}},
	} {
		if err := srv.CreateEntry(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	bundle, err := srv.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	// The agent learns of the entries at its next sync.
	if _, err := spire.FetchOwnSVID(ctx, agent.WorkloadSocket); err != nil {
		t.Fatal(err)
	}
	iss, err := spire.New(agent.AdminSocket, td, spire.Options{Delegate: delegate, Logger: log,
		MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer iss.Close()
	var before *x509svid.SVID
	for {
		if before, err = iss.FetchSVID(ctx, cart); err == nil || !errors.Is(err, spire.ErrNotRegistered) {
			break
		}
		time.Sleep(200 * time.Millisecond) // the entry is not synced yet
	}
	if err != nil {
		t.Fatal(err)
	}

	if err := srv.KillAgent(agent); err != nil {
		t.Fatal(err)
	}
	if err := srv.KillServer(); err != nil {
		t.Fatal(err)
	}
	if _, err := iss.Bundle(ctx); err == nil {
		// The issuer learns of the break when its stream fails; wait for it.
		deadline := time.Now().Add(10 * time.Second)
		for err == nil && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			_, err = iss.Bundle(ctx)
		}
		if err == nil {
			t.Fatal("the issuer still answers with the bundle 10 s after the SPIRE agent was killed")
		}
	}
	if got, err := iss.FetchSVID(ctx, cart); err != nil || !got.Certificates[0].Equal(before.Certificates[0]) {
		t.Fatalf("with SPIRE down, the delegate's SVID: %v; want the one it had", err)
	}

	if err := srv.RestartServer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := srv.RestartAgent(ctx, agent); err != nil {
		t.Fatal(err)
	}
	for {
		after, err := iss.FetchSVID(ctx, cart)
		if err != nil {
			t.Fatal(err)
		}
		if !after.Certificates[0].Equal(before.Certificates[0]) {
			if got, _, err := x509svid.Verify(after.Certificates, bundle); err != nil || got != cart {
				t.Fatalf("the SVID after the restart: %v, %v; want %s verified by the bundle of before", got, err, cart)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no new SVID from the restarted SPIRE agent: %v", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
