package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// lockedAudit collects the cluster CA's audit lines.
type lockedAudit struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedAudit) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedAudit) signed() map[string]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]bool{}
	for _, line := range strings.Split(l.b.String(), "\n") {
		var ev struct{ Verdict, Reason, CallerNode, RequestedID string }
		var raw map[string]any
		if json.Unmarshal([]byte(line), &raw) != nil {
			continue
		}
		ev.Verdict, _ = raw["verdict"].(string)
		ev.CallerNode, _ = raw["caller_node"].(string)
		ev.RequestedID, _ = raw["requested_id"].(string)
		if ev.Verdict == "signed" {
			out[ev.CallerNode+" "+ev.RequestedID] = true
		}
	}
	return out
}

// TestClusterCAIssuesPerNodeAndRotatesUnderLoad runs the agents in
// Kubernetes mode with --issuer cluster-ca: the cluster CA runs on the
// control plane (its keys in a Secret, no CA directory on the nodes), each
// agent proves its node with a token bound to its own pod object.
//   - mTLS works across the two nodes, and the CA signed each node only the
//     identities of its own pods;
//   - node1's token cannot get the identity of node2's pod;
//   - a root rotation through the Secret (prepare, activate, finish) under
//     continuous traffic (a new connection after another, and one
//     long-lived connection) fails no connection: both agents trust both
//     roots, renew under the new one, then drop the old one.
func TestClusterCAIssuesPerNodeAndRotatesUnderLoad(t *testing.T) {
	const ns = "mantlet-system"
	var (
		srv      *clusterca.Server
		caAddr   = netip.AddrPortFrom(testbed.ControlPlaneIP, clusterca.DefaultPort)
		dir      = t.TempDir()
		bundle   = filepath.Join(dir, "bundle.pem")
		audit    = &lockedAudit{}
		tokens   = map[string]string{}
		serverID = spiffeid.RequireFromString("spiffe://" + identity.DefaultTrustDomain.Name() + "/ns/" + ns + "/sa/mantlet-ca")
	)
	setup := func(ctx context.Context, km *kubeMesh, m *meshtest.Mesh) error {
		admin := km.api.Admin()
		// The CA of the mesh, given to the cluster CA as its Secret.
		authority, err := ca.Load(m.CADir, ca.Options{})
		if err != nil {
			return err
		}
		files, err := authority.Files()
		if err != nil {
			return err
		}
		if _, err := admin.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: clusterca.DefaultSecretName}, Data: files},
			metav1.CreateOptions{}); err != nil {
			return err
		}
		// Each node's agent pod, and a token bound to it for the CA.
		for _, node := range []string{"node1", "node2"} {
			p, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "mantlet-agent-" + node},
				Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "mantlet-agent", HostNetwork: true,
					Containers: []corev1.Container{{Name: "agent", Image: "registry.example/mantlet/mantlet"}}}}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			p.Status.Phase = corev1.PodRunning
			if p, err = admin.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
				return err
			}
			ttl := int64(3600)
			tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "mantlet-agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
				Audiences: []string{clusterca.DefaultAudience}, ExpirationSeconds: &ttl,
				BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID}}}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			tokens[node] = tr.Status.Token
			if err := os.WriteFile(filepath.Join(dir, node+".token"), []byte(tr.Status.Token), 0o600); err != nil {
				return err
			}
		}
		if srv, err = clusterca.New(ctx, clusterca.Config{Client: admin, Namespace: ns, TrustDomain: identity.DefaultTrustDomain,
			Agents: []string{ns + "/mantlet-agent"}, ServerID: serverID, Audit: audit, ReloadEvery: 200 * time.Millisecond}); err != nil {
			return err
		}
		ln, err := m.TB.ControlPlane().Listen(ctx, "tcp", caAddr.String())
		if err != nil {
			return err
		}
		rctx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.Run(rctx, ln) }()
		t.Cleanup(func() {
			stop()
			if err := <-done; err != nil {
				t.Errorf("the cluster CA: %v", err)
			}
		})
		for ok, why := srv.Ready(); !ok; ok, why = srv.Ready() {
			if rctx.Err() != nil {
				return fmt.Errorf("the cluster CA is not ready: %s", why)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// As the kubelet keeps the mounted ConfigMap current.
		syncBundle := func() error {
			cm, err := admin.CoreV1().ConfigMaps(ns).Get(rctx, clusterca.DefaultBundleConfigMap, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if err := os.WriteFile(bundle+".new", []byte(cm.Data[clusterca.BundleKey]), 0o644); err != nil {
				return err
			}
			return os.Rename(bundle+".new", bundle)
		}
		if err := syncBundle(); err != nil {
			return err
		}
		kubeletDone := make(chan struct{})
		go func() {
			defer close(kubeletDone)
			for rctx.Err() == nil {
				time.Sleep(500 * time.Millisecond)
				_ = syncBundle()
			}
		}()
		t.Cleanup(func() { stop(); <-kubeletDone })
		return nil
	}
	km := startKubeMeshWith(t, testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server"}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}, meshtest.Options{
		IssuerArgs: func(node string) []string {
			return []string{"--issuer", "cluster-ca", "--ca-address", caAddr.String(), "--ca-bundle", bundle,
				"--token-file", filepath.Join(dir, node+".token"), "--ca-server-id", serverID.String()}
		},
		AgentArgs: []string{"--svid-reissue-spread", "3s"},
	}, setup)
	m := km.Mesh
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	target := startCountingEcho(t, m, "server", appPort)
	marker := newMarker(t)
	long := dial(t, m, "client", target.addr)
	defer long.Close()
	ping(t, long, marker)

	clientID, _ := m.ID("client")
	serverWID, _ := m.ID("server")
	signed := audit.signed()
	if !signed["node1 "+clientID.String()] || !signed["node2 "+serverWID.String()] {
		t.Errorf("signed (node, identity): %v; want the client's to node1 and the server's to node2", signed)
	}
	if signed["node1 "+serverWID.String()] || signed["node2 "+clientID.String()] {
		t.Errorf("a node got an identity of a pod on the other node: %v", signed)
	}

	t.Run("node1's token cannot get node2's pod's identity", func(t *testing.T) {
		body, _ := json.Marshal(clusterca.SignRequest{SPIFFEID: serverWID.String(), CSR: []byte{0x30}})
		r := httptest.NewRequest(http.MethodPost, clusterca.SignPath, bytes.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+tokens["node1"])
		w := httptest.NewRecorder()
		srv.Handler().ServeHTTP(w, r)
		var e clusterca.ErrorResponse
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || w.Code != http.StatusForbidden || e.Reason != "no_pod_on_node" {
			t.Errorf("%d %s; want 403 no_pod_on_node", w.Code, w.Body)
		}
	})

	t.Run("a root rotation under load fails no connection", func(t *testing.T) {
		admin := km.api.Admin()
		stopLoad := make(chan struct{})
		l := startLoad(m, "client", target.addr, stopLoad, 1_000_000)
		defer func() {
			select {
			case <-stopLoad:
			default:
				close(stopLoad)
			}
			<-l.done
		}()
		roots := func(node string) (bundle []string, svids map[string]string) {
			st, err := m.Status(ctx, node)
			if err != nil {
				return nil, nil
			}
			for _, b := range st.Bundles {
				if b.TrustDomain == identity.DefaultTrustDomain.Name() {
					for _, r := range b.Roots {
						bundle = append(bundle, r.Fingerprint)
					}
				}
			}
			certs, err := m.Admin(node).Certs(ctx)
			if err != nil {
				return bundle, nil
			}
			svids = map[string]string{}
			for _, c := range certs {
				svids[c.Identity] = c.Root
			}
			return bundle, svids
		}
		start := time.Now()
		prepared, err := clusterca.RotateSecret(ctx, admin, ns, clusterca.DefaultSecretName, (*ca.CA).Prepare)
		if err != nil {
			t.Fatal(err)
		}
		next := identity.Fingerprint(prepared.NextRoot())
		for _, node := range []string{"node1", "node2"} {
			waitFor(t, node+" trusting both roots", func() (bool, string) {
				b, _ := roots(node)
				return len(b) == 2, fmt.Sprint(b)
			})
		}
		if _, err := clusterca.RotateSecret(ctx, admin, ns, clusterca.DefaultSecretName, (*ca.CA).Activate); err != nil {
			t.Fatal(err)
		}
		for _, node := range []string{"node1", "node2"} {
			waitFor(t, node+" renewing its SVIDs under the new root", func() (bool, string) {
				_, svids := roots(node)
				for _, r := range svids {
					if r != next {
						return false, fmt.Sprint(svids)
					}
				}
				return len(svids) > 0, fmt.Sprint(svids)
			})
		}
		if _, err := clusterca.RotateSecret(ctx, admin, ns, clusterca.DefaultSecretName, (*ca.CA).Finish); err != nil {
			t.Fatal(err)
		}
		for _, node := range []string{"node1", "node2"} {
			waitFor(t, node+" dropping the old root", func() (bool, string) {
				b, _ := roots(node)
				return len(b) == 1 && b[0] == next, fmt.Sprint(b)
			})
		}
		// New handshakes under the new root alone, for a few seconds more.
		time.Sleep(3 * time.Second)
		close(stopLoad)
		<-l.done
		ping(t, long, newMarker(t))
		t.Logf("rotation took %v; %d connections during it, %d failed; the long-lived connection survived",
			time.Since(start).Round(time.Second), l.ok.Load()+l.failed.Load(), l.failed.Load())
		if n := l.failed.Load(); n > 0 {
			t.Errorf("%d of %d connections failed during the rotation, first: %v", n, n+l.ok.Load(), l.first.Load())
		}
		if l.ok.Load() < 100 {
			t.Errorf("only %d connections during the rotation: the load did not run", l.ok.Load())
		}
	})
}
