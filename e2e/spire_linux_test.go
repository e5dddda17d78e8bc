package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/spiretest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// SPIRE as the mesh's certificate authority (issue 13): a real SPIRE
// server in the testbed's control plane, a SPIRE agent on each node, and
// mantlet's agents started with --issuer spire.

// spireDelegate is the SPIFFE ID the SPIRE agents give mantlet's agent and
// list in authorized_delegates.
var spireDelegate = spiffeid.RequireFromString("spiffe://cluster.local/mantlet/agent")

// spireSVIDTTL is the lifetime of the workloads' SVIDs in the SPIRE
// entries: SPIRE backdates them by 10 s and its agents renew them at half
// their life (±10%), so a new SVID comes about every 10 to 20 s.
const spireSVIDTTL = 30 * time.Second

// spireMesh is a mesh whose SVIDs come from SPIRE.
type spireMesh struct {
	*meshtest.Mesh
	spire  *spiretest.Server
	agents map[string]*spiretest.Agent
}

// startSPIREMesh starts the testbed with a control plane, a SPIRE server
// in it and a SPIRE agent per node, registers mantlet's agent as the
// delegate (selectors unix:uid:0 and unix:path of the mantlet binary, as
// SPIRE's unix attestor sees the process) and every pod's identity by
// k8s:ns and k8s:sa (what the delegate subscribes with) under its node's
// SPIRE agent only, then starts mantlet's agents with --issuer spire.
func startSPIREMesh(t *testing.T, spec testbed.Spec) *spireMesh {
	t.Helper()
	privtest.Require(t)
	bins := spiretest.RequireBinaries(t)
	exe, err := filepath.Abs(binary)
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		t.Fatal(err)
	}
	spec.ControlPlane = true
	sm := &spireMesh{agents: map[string]*spiretest.Agent{}}
	var mu sync.Mutex
	sm.Mesh = startMesh(t, spec, meshtest.Options{
		// Each agent first waits for its own identity: its SPIRE agent
		// learns of the delegate's entry at its next sync with the
		// server (every 5 s), and mantlet asks every second.
		ReadyTimeout: time.Minute,
		IssuerArgs: func(node string) []string {
			mu.Lock()
			a := sm.agents[node]
			mu.Unlock()
			return []string{"--issuer", "spire", "--spire-admin-socket", a.AdminSocket, "--spire-workload-socket", a.WorkloadSocket}
		},
		Cluster: func(ctx context.Context, m *meshtest.Mesh) ([]string, error) {
			srv, err := spiretest.Start(ctx, spiretest.Options{Binaries: &bins, NetNS: m.TB.ControlPlane().NS,
				Listen: netip.AddrPortFrom(testbed.ControlPlaneIP, 8081), Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
			if err != nil {
				return nil, err
			}
			sm.spire = srv
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("SPIRE logs:\n%s", srv.Logs(80))
				}
				if err := srv.Stop(); err != nil {
					t.Errorf("stop SPIRE: %v", err)
				}
			})
			for _, n := range m.TB.Nodes() {
				a, err := srv.StartAgent(ctx, n.Name, spiretest.AgentOptions{NetNS: n.NS, AuthorizedDelegates: []spiffeid.ID{spireDelegate}})
				if err != nil {
					return nil, err
				}
				mu.Lock()
				sm.agents[n.Name] = a
				mu.Unlock()
				if err := srv.CreateEntry(ctx, spiretest.Entry{ID: spireDelegate, Parent: a.ID, Selectors: []string{"unix:uid:0", "unix:path:" + exe}}); err != nil {
					return nil, err
				}
				for _, p := range m.TB.Pods() {
					if p.Node != n.Name {
						continue
					}
					id, err := m.ID(p.Name)
					if err != nil {
						return nil, err
					}
					if err := srv.CreateEntry(ctx, spiretest.Entry{ID: id, Parent: a.ID, X509SVIDTTL: spireSVIDTTL,
						Selectors: []string{"k8s:ns:" + p.Namespace, "k8s:sa:" + p.ServiceAccount}}); err != nil {
						return nil, err
					}
				}
			}
			return []string{"--config", m.ConfigPath}, nil
		},
	})
	return sm
}

// presented returns the certificate chain the HBONE server of the node
// that holds pod presents for it, as seen from node: a TLS handshake
// without a client certificate, which the server then refuses.
func presented(ctx context.Context, m *meshtest.Mesh, node, pod string) ([]*x509.Certificate, error) {
	addr := netip.AddrPortFrom(m.Pod(pod).IP, meshtest.HBONEPort)
	raw, err := m.Node(node).Dial(ctx, "tcp4", addr.String())
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	var chain []*x509.Certificate
	tc := tls.Client(raw, &tls.Config{
		MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		InsecureSkipVerify: true, // the chain is checked below, against SPIRE's bundle
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			for _, der := range rawCerts {
				c, err := x509.ParseCertificate(der)
				if err != nil {
					return err
				}
				chain = append(chain, c)
			}
			return nil
		},
	})
	hsErr := tc.HandshakeContext(ctx)
	if len(chain) == 0 {
		return nil, fmt.Errorf("no certificate from %s (handshake: %v)", addr, hsErr)
	}
	return chain, nil
}

// lastExpiry returns the NotAfter of the last SVID node's identity
// manager took for id, from the agent's log.
func lastExpiry(m *meshtest.Mesh, node string, id spiffeid.ID) time.Time {
	var last time.Time
	for _, r := range m.Records(node) {
		if r["msg"] == "SVID issued" && r["spiffe_id"] == id.String() {
			if s, ok := r["not_after"].(string); ok {
				last, _ = time.Parse(time.RFC3339Nano, s)
			}
		}
	}
	return last
}

// svidSerials returns the serials of the SVIDs node's identity manager
// took for id, in order, from the agent's log.
func svidSerials(m *meshtest.Mesh, node string, id spiffeid.ID) []string {
	var out []string
	for _, r := range m.Records(node) {
		if r["msg"] == "SVID issued" && r["spiffe_id"] == id.String() {
			if s, ok := r["serial"].(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}

func TestSPIREIssuesTheSVIDsAndItsRotationsDropNothing(t *testing.T) {
	sm := startSPIREMesh(t, twoNodeShop())
	m := sm.Mesh
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := startCountingEcho(t, m, "server", appPort)
	clientID, err := m.ID("client")
	if err != nil {
		t.Fatal(err)
	}
	serverID, err := m.ID("server")
	if err != nil {
		t.Fatal(err)
	}

	// mTLS across the two nodes works, on SPIRE's certificates, once each
	// agent has its pod's SVID (entries reach SPIRE agents at their sync).
	for _, w := range []struct {
		node string
		id   spiffeid.ID
	}{{"node1", clientID}, {"node2", serverID}} {
		waitUntil(t, ctx, fmt.Sprintf("an SVID of %s on %s", w.id, w.node), func() bool { return len(svidSerials(m, w.node, w.id)) > 0 })
	}
	if err := probe(m, "client", srv.addr); err != nil {
		t.Fatalf("client (node1) to server (node2): %v", err)
	}
	bundle, err := sm.spire.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	chain, err := presented(ctx, m, "node1", "server")
	if err != nil {
		t.Fatal(err)
	}
	checkSPIRESVID(t, chain, bundle, m.Bundle(), serverID)
	for _, node := range []string{"node1", "node2"} {
		if !hasRecord(m, node, "SPIRE issues the workloads' SVIDs", "delegate", spireDelegate.String()) {
			t.Errorf("%s's agent did not log that SPIRE issues its SVIDs, as delegate %s", node, spireDelegate)
		}
	}

	// Traffic during SPIRE's rotations: a new connection at a time, back
	// to back, and one long connection that echoes every 100 ms; until
	// both identities got a new SVID from SPIRE at least once, the server
	// presented it to new handshakes, and the SVIDs of the start have
	// expired (so the HBONE connections made with them were retired),
	// then one second more.
	baseClient, baseServer := serialSet(svidSerials(m, "node1", clientID)), serialSet(svidSerials(m, "node2", serverID))
	expired := lastExpiry(m, "node1", clientID)
	if e := lastExpiry(m, "node2", serverID); e.After(expired) {
		expired = e
	}
	stop := make(chan struct{})
	l := startLoad(m, "client", srv.addr, stop, 1_000_000)
	long := startLongEcho(m, "client", srv.addr, stop)
	presentedSerials := map[string]bool{chain[0].SerialNumber.Text(16): true}
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	for {
		if c, err := presented(ctx, m, "node1", "server"); err == nil {
			checkSPIRESVID(t, c, bundle, m.Bundle(), serverID)
			presentedSerials[c[0].SerialNumber.Text(16)] = true
		}
		cs, ss := svidSerials(m, "node1", clientID), svidSerials(m, "node2", serverID)
		if hasNew(cs, baseClient) && hasNew(ss, baseServer) && len(presentedSerials) > 1 && time.Now().After(expired) {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			<-l.done
			<-long.done
			t.Fatalf("no rotation within %v: client SVIDs %v, server SVIDs %v, server presented %d serials; the first SVIDs expire at %v",
				deadline.Sub(start), cs, ss, len(presentedSerials), expired)
		}
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(time.Second)
	close(stop)
	<-l.done
	<-long.done
	took := time.Since(start).Round(100 * time.Millisecond)
	cs, ss := svidSerials(m, "node1", clientID), svidSerials(m, "node2", serverID)
	t.Logf("over %v: %d connections ok, %d failed; the long connection echoed %d times (error: %v); new SVIDs from SPIRE: client %d, server %d; the server presented %d serials",
		took, l.ok.Load(), l.failed.Load(), long.echoes.Load(), long.err, countNew(cs, baseClient), countNew(ss, baseServer), len(presentedSerials))
	if n := l.failed.Load(); n > 0 {
		t.Errorf("%d of %d connections failed during SPIRE's rotations; the first: %v", n, n+l.ok.Load(), l.first.Load())
	}
	if l.ok.Load() < 100 {
		t.Errorf("only %d connections in %v: the load did not run", l.ok.Load(), took)
	}
	if long.err != nil || long.echoes.Load() < int64(took/(200*time.Millisecond)) {
		t.Errorf("the long connection: %d echoes in %v, error %v; want one every 100 ms and no error", long.echoes.Load(), took, long.err)
	}
	if err := probe(m, "client", srv.addr); err != nil {
		t.Errorf("after the rotations: %v", err)
	}
}

// checkSPIRESVID checks that chain is an SVID of id that SPIRE signed
// (it verifies against SPIRE's bundle and not against the mesh's own CA,
// which the agents were not given) with the entry's lifetime.
func checkSPIRESVID(t *testing.T, chain []*x509.Certificate, spireBundle, meshBundle *x509bundle.Bundle, id spiffeid.ID) {
	t.Helper()
	got, _, err := x509svid.Verify(chain, spireBundle)
	if err != nil || got != id {
		t.Fatalf("the HBONE server presented %v (serial %s), verifying against SPIRE's bundle: %v; want %s", got, chain[0].SerialNumber.Text(16), err, id)
	}
	if _, _, err := x509svid.Verify(chain, meshBundle); err == nil {
		t.Fatal("the presented SVID also verifies against meshtest's CA: not SPIRE's")
	}
	// SPIRE backdates its SVIDs by 10 s.
	if life := chain[0].NotAfter.Sub(chain[0].NotBefore); life != spireSVIDTTL+10*time.Second {
		t.Errorf("the presented SVID lives %v, want the entry's %v plus SPIRE's 10 s backdating", life, spireSVIDTTL)
	}
}

func serialSet(xs []string) map[string]bool {
	m := map[string]bool{}
	for _, x := range xs {
		m[x] = true
	}
	return m
}

// countNew counts the members of xs not in base.
func countNew(xs []string, base map[string]bool) int {
	n := 0
	for x := range serialSet(xs) {
		if !base[x] {
			n++
		}
	}
	return n
}

func hasNew(xs []string, base map[string]bool) bool { return countNew(xs, base) > 0 }

// waitUntil polls cond every 100 ms until it holds or ctx ends.
func waitUntil(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("no %s: %v", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// hasRecord reports whether node's agent logged msg with attribute key
// equal to value.
func hasRecord(m *meshtest.Mesh, node, msg, key, value string) bool {
	for _, r := range m.Records(node) {
		if r["msg"] == msg && r[key] == value {
			return true
		}
	}
	return false
}

// longEcho is one connection that echoes a message every 100 ms until
// stop is closed.
type longEcho struct {
	echoes atomic.Int64
	err    error // set before done is closed
	done   chan struct{}
}

func startLongEcho(m *meshtest.Mesh, pod string, addr netip.AddrPort, stop <-chan struct{}) *longEcho {
	e := &longEcho{done: make(chan struct{})}
	go func() {
		defer close(e.done)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := m.Dial(ctx, pod, addr)
		cancel()
		if err != nil {
			e.err = err
			return
		}
		defer c.Close()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := echoed(c, fmt.Sprintf("ping %06d", i)); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					err = fmt.Errorf("echo %d timed out: %w", i, err)
				}
				e.err = err
				return
			}
			e.echoes.Add(1)
		}
	}()
	return e
}
