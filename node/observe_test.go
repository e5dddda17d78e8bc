package node

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
)

type nopSVIDs struct{ ztunnel.SVIDSource }

type noBundles struct{}

func (noBundles) GetX509BundleForTrustDomain(spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return nil, errors.New("no bundles here")
}

// TestAgentObservabilityServesTheAdminAPI starts what the agent starts for
// observability (access log file, admin API on TCP and a socket named
// after the node) and asks both listeners for the status.
func TestObservabilityServesTheAdminAPI(t *testing.T) {
	dir := t.TempDir()
	of := &ObserveConfig{AdminAddr: "127.0.0.1:0", AdminSocket: filepath.Join(dir, NodePlaceholder, "admin.sock"),
		AccessLog: filepath.Join(dir, "access.log"), AccessLogRate: 10, FlowLogSize: 16}
	o, err := newObservability(of, "node-7", "node-7", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	addrs := o.addrs()
	if len(addrs) != 2 || addrs[1] != filepath.Join(dir, "node-7", "admin.sock") {
		t.Fatalf("admin API listens on %v, want TCP and the socket of node-7", addrs)
	}
	store := workload.NewStore()
	p, err := ztunnel.New(ztunnel.Config{NodeName: "node-7", TrustDomain: identity.DefaultTrustDomain, Store: store, SVIDs: nopSVIDs{}, Bundles: noBundles{}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	ctx, cancel := context.WithCancel(context.Background())
	g := newGroup(ctx)
	o.run(ctx, g, p, admin.Config{Node: "node-7", Snapshot: store.Load, Ready: func() (bool, string) { return true, "ready: test" }})
	for _, addr := range addrs {
		c, err := admin.NewClient(addr)
		if err != nil {
			t.Fatal(err)
		}
		st, err := c.Status(ctx)
		c.Close()
		if err != nil || st.Node != "node-7" || !st.Ready {
			t.Errorf("status through %s: %+v, %v", addr, st, err)
		}
	}
	cancel()
	if err := g.wait(); err != nil {
		t.Error(err)
	}
	o.close()
	if _, err := os.Stat(filepath.Join(dir, "node-7")); !os.IsNotExist(err) {
		t.Errorf("the socket's directory outlives the agent: %v", err)
	}
	if _, err := os.Stat(of.AccessLog); err != nil {
		t.Errorf("access log file: %v", err)
	}
}

func TestObservabilityRefusesABusyAdminPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	of := &ObserveConfig{AdminAddr: ln.Addr().String(), FlowLogSize: 16}
	_, err = newObservability(of, "n", "n", slog.New(slog.DiscardHandler))
	if want := "admin API on " + ln.Addr().String() + ": listen tcp " + ln.Addr().String(); err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("err = %v, want %q and the listen error", err, want)
	}
}
