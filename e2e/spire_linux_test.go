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

	"github.com/mantlet/mantlet/admin"
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
// SPIRE agent only, with SVIDs that live ttl (0: the server's default, an
// hour), then starts mantlet's agents with --issuer spire.
func startSPIREMesh(t *testing.T, spec testbed.Spec, ttl time.Duration) *spireMesh {
	t.Helper()
	privtest.Require(t)
	bins := spiretest.RequireBinaries(t)
	if spireBinary == "" {
		t.Fatalf("no mantlet built with -tags spire: set %s along with %s", spireBinaryEnv, meshtest.BinaryEnv)
	}
	exe, err := filepath.Abs(spireBinary)
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
		Binary: exe,
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
					if err := srv.CreateEntry(ctx, spiretest.Entry{ID: id, Parent: a.ID, X509SVIDTTL: ttl,
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

// svidOf returns the SVID node's agent holds for id, as its admin API
// lists it (/v1/certs); ok is false while it holds none.
func svidOf(ctx context.Context, m *meshtest.Mesh, node string, id spiffeid.ID) (c admin.Cert, ok bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	certs, err := m.Admin(node).Certs(ctx)
	if err != nil {
		return admin.Cert{}, false, fmt.Errorf("certificates of %s: %w", node, err)
	}
	for _, c := range certs {
		if c.Identity == id.String() && c.Serial != "" {
			return c, true, nil
		}
	}
	return admin.Cert{}, false, nil
}

// waitSVID waits until node's agent holds an SVID for id other than the
// one whose serial is not (any, if not is empty), and returns it.
func waitSVID(t *testing.T, ctx context.Context, m *meshtest.Mesh, node string, id spiffeid.ID, not string) admin.Cert {
	t.Helper()
	for {
		c, ok, err := svidOf(ctx, m, node, id)
		if err == nil && ok && c.Serial != not {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no SVID of %s on %s other than %q: %v (last: %+v, %v)", id, node, not, ctx.Err(), c, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// rotationWatch records the serials node's agent held for id, polled.
type rotationWatch struct {
	node    string
	id      spiffeid.ID
	first   admin.Cert
	serials map[string]bool
}

func (w *rotationWatch) poll(ctx context.Context, m *meshtest.Mesh) {
	if c, ok, err := svidOf(ctx, m, w.node, w.id); err == nil && ok {
		w.serials[c.Serial] = true
	}
}

// rotated reports whether the agent held an SVID other than the first.
func (w *rotationWatch) rotated() bool { return len(w.serials) > 1 }

func TestSPIREIssuesTheSVIDsAndItsRotationsDropNothing(t *testing.T) {
	sm := startSPIREMesh(t, twoNodeShop(), spireSVIDTTL)
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
	watches := []*rotationWatch{{node: "node1", id: clientID}, {node: "node2", id: serverID}}
	for _, w := range watches {
		w.first = waitSVID(t, ctx, m, w.node, w.id, "")
		w.serials = map[string]bool{w.first.Serial: true}
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
	checkSPIRESVID(t, chain, bundle, m.Bundle(), serverID, spireSVIDTTL)
	for _, node := range []string{"node1", "node2"} {
		if !hasRecord(m, node, "SPIRE issues the workloads' SVIDs", "delegate", spireDelegate.String()) {
			t.Errorf("%s's agent did not log that SPIRE issues its SVIDs, as delegate %s", node, spireDelegate)
		}
	}

	// Traffic during SPIRE's rotations: a new connection at a time, back
	// to back, and one long connection that echoes every 100 ms; until
	// both identities got a new SVID from SPIRE at least once, the server
	// presented one to new handshakes, and the SVIDs of the start have
	// expired (so the HBONE connections made with them were retired),
	// then one second more.
	expired := watches[0].first.NotAfter
	if e := watches[1].first.NotAfter; e.After(expired) {
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
			checkSPIRESVID(t, c, bundle, m.Bundle(), serverID, spireSVIDTTL)
			presentedSerials[c[0].SerialNumber.Text(16)] = true
		}
		for _, w := range watches {
			w.poll(ctx, m)
		}
		if watches[0].rotated() && watches[1].rotated() && len(presentedSerials) > 1 && time.Now().After(expired) {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			<-l.done
			<-long.done
			t.Fatalf("no rotation within %v: client SVIDs %v, server SVIDs %v, server presented %d serials; the first SVIDs expire at %v",
				deadline.Sub(start), watches[0].serials, watches[1].serials, len(presentedSerials), expired)
		}
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(time.Second)
	close(stop)
	<-l.done
	<-long.done
	took := time.Since(start).Round(100 * time.Millisecond)
	t.Logf("over %v: %d connections ok, %d failed; the long connection echoed %d times (error: %v); SVIDs from SPIRE: client %d, server %d; the server presented %d serials",
		took, l.ok.Load(), l.failed.Load(), long.echoes.Load(), long.err, len(watches[0].serials), len(watches[1].serials), len(presentedSerials))
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

// TestSPIREDownTheAgentsKeepServingTheirSVIDs kills the SPIRE server and
// both SPIRE agents under traffic: mantlet's agents keep the SVIDs they
// have (an hour's, the server's default) and keep serving with them, and
// when SPIRE comes back they take new SVIDs from it, all without a failed
// connection.
func TestSPIREDownTheAgentsKeepServingTheirSVIDs(t *testing.T) {
	sm := startSPIREMesh(t, twoNodeShop(), 0)
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
	held := []struct {
		node  string
		id    spiffeid.ID
		first admin.Cert
	}{{node: "node1", id: clientID}, {node: "node2", id: serverID}}
	for i := range held {
		held[i].first = waitSVID(t, ctx, m, held[i].node, held[i].id, "")
	}
	if err := probe(m, "client", srv.addr); err != nil {
		t.Fatalf("client (node1) to server (node2): %v", err)
	}
	bundle, err := sm.spire.Bundle()
	if err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	l := startLoad(m, "client", srv.addr, stop, 1_000_000)
	long := startLongEcho(m, "client", srv.addr, stop)
	stopLoad := sync.OnceFunc(func() {
		close(stop)
		<-l.done
		<-long.done
	})
	defer stopLoad()
	start := time.Now()

	// SPIRE goes down, agents and server; each mantlet agent notices (its
	// subscriptions break) and the traffic goes on for three seconds more.
	for _, node := range []string{"node1", "node2"} {
		if err := sm.spire.KillAgent(sm.agents[node]); err != nil {
			t.Fatal(err)
		}
	}
	if err := sm.spire.KillServer(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	for _, node := range []string{"node1", "node2"} {
		waitUntil(t, ctx, node+"'s agent noticing that SPIRE is down", func() bool {
			return hasRecordMsg(m, node, "SPIRE subscription broken; opening it again")
		})
	}
	time.Sleep(3 * time.Second)
	for _, h := range held {
		c, ok, err := svidOf(ctx, m, h.node, h.id)
		if err != nil || !ok || c.Serial != h.first.Serial {
			t.Errorf("with SPIRE down, %s holds %+v (%v) for %s; want the SVID it had, serial %s", h.node, c, err, h.id, h.first.Serial)
		}
		st, err := m.Status(ctx, h.node)
		if err != nil || !st.Ready {
			t.Errorf("with SPIRE down, %s's agent: ready %v (%s), %v; want ready", h.node, st.Ready, st.Reason, err)
		}
	}
	if chain, err := presented(ctx, m, "node1", "server"); err != nil {
		t.Errorf("with SPIRE down, the server's HBONE handshake: %v", err)
	} else if got := chain[0].SerialNumber.Text(16); got != held[1].first.Serial {
		t.Errorf("with SPIRE down, the server presents serial %s; want %s, the one it had", got, held[1].first.Serial)
	}
	okDown, failedDown := l.ok.Load(), l.failed.Load()

	// SPIRE comes back: each agent takes a new SVID from it, which the
	// server presents.
	if err := sm.spire.RestartServer(ctx); err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node1", "node2"} {
		if err := sm.spire.RestartAgent(ctx, sm.agents[node]); err != nil {
			t.Fatal(err)
		}
	}
	back := time.Now()
	for _, h := range held {
		waitSVID(t, ctx, m, h.node, h.id, h.first.Serial)
	}
	again := time.Since(back).Round(100 * time.Millisecond)
	chain, err := presented(ctx, m, "node1", "server")
	if err != nil {
		t.Fatal(err)
	}
	checkSPIRESVID(t, chain, bundle, m.Bundle(), serverID, time.Hour)
	time.Sleep(time.Second)
	stopLoad()
	took := time.Since(start).Round(100 * time.Millisecond)
	t.Logf("over %v (SPIRE down %v, new SVIDs %v after it came back): %d connections ok, %d failed (%d and %d while SPIRE was down); the long connection echoed %d times (error: %v)",
		took, back.Sub(down).Round(100*time.Millisecond), again, l.ok.Load(), l.failed.Load(), okDown, failedDown, long.echoes.Load(), long.err)
	if n := l.failed.Load(); n > 0 {
		t.Errorf("%d of %d connections failed while SPIRE was down and came back; the first: %v", n, n+l.ok.Load(), l.first.Load())
	}
	if okDown < 100 {
		t.Errorf("only %d connections while SPIRE was down: the load did not run", okDown)
	}
	if long.err != nil || long.echoes.Load() < int64(took/(200*time.Millisecond)) {
		t.Errorf("the long connection: %d echoes in %v, error %v; want one every 100 ms and no error", long.echoes.Load(), took, long.err)
	}
}

// checkSPIRESVID checks that chain is an SVID of id that SPIRE signed
// (it verifies against SPIRE's bundle and not against the mesh's own CA,
// which the agents were not given) with the entry's lifetime ttl.
func checkSPIRESVID(t *testing.T, chain []*x509.Certificate, spireBundle, meshBundle *x509bundle.Bundle, id spiffeid.ID, ttl time.Duration) {
	t.Helper()
	got, _, err := x509svid.Verify(chain, spireBundle)
	if err != nil || got != id {
		t.Fatalf("the HBONE server presented %v (serial %s), verifying against SPIRE's bundle: %v; want %s", got, chain[0].SerialNumber.Text(16), err, id)
	}
	if _, _, err := x509svid.Verify(chain, meshBundle); err == nil {
		t.Fatal("the presented SVID also verifies against meshtest's CA: not SPIRE's")
	}
	// SPIRE backdates its SVIDs by 10 s.
	if life := chain[0].NotAfter.Sub(chain[0].NotBefore); life != ttl+10*time.Second {
		t.Errorf("the presented SVID lives %v, want the entry's %v plus SPIRE's 10 s backdating", life, ttl)
	}
}

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

// hasRecordMsg reports whether node's agent logged msg.
func hasRecordMsg(m *meshtest.Mesh, node, msg string) bool {
	for _, r := range m.Records(node) {
		if r["msg"] == msg {
			return true
		}
	}
	return false
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
