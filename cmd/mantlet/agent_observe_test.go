package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
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
func TestAgentObservabilityServesTheAdminAPI(t *testing.T) {
	dir := t.TempDir()
	of := &observeFlags{adminAddr: "127.0.0.1:0", adminSocket: filepath.Join(dir, nodePlaceholder, "admin.sock"),
		accessLog: filepath.Join(dir, "access.log"), accessLogRate: 10, flowLogSize: 16}
	o, err := newObservability(of, "node-7", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	addrs := o.addrs()
	if len(addrs) != 2 || addrs[1] != filepath.Join(dir, "node-7", "admin.sock") {
		t.Fatalf("admin API listens on %v, want TCP and the socket of node-7", addrs)
	}
	store := workload.NewStore()
	p, err := ztunnel.New(ztunnel.Config{NodeName: "node-7", Store: store, SVIDs: nopSVIDs{}, Bundles: noBundles{}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, observeGoroutines)
	o.run(ctx, func(name string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil {
				errs <- errors.New(name + ": " + err.Error())
			}
		}()
	}, p, admin.Config{Node: "node-7", Snapshot: store.Load, Ready: func() (bool, string) { return true, "ready: test" }})
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
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	o.close()
	if _, err := os.Stat(filepath.Join(dir, "node-7")); !os.IsNotExist(err) {
		t.Errorf("the socket's directory outlives the agent: %v", err)
	}
	if _, err := os.Stat(of.accessLog); err != nil {
		t.Errorf("access log file: %v", err)
	}
}

func TestAgentObservabilityRefusesABusyAdminPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	of := &observeFlags{adminAddr: ln.Addr().String(), flowLogSize: 16}
	_, err = newObservability(of, "n", slog.New(slog.DiscardHandler))
	if err == nil || !strings.HasPrefix(err.Error(), "--admin-addr: listen tcp "+ln.Addr().String()) {
		t.Errorf("err = %v, want --admin-addr: the listen error", err)
	}
}
