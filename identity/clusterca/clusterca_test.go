package clusterca_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/internal/kubetest"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	cartID   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	payID    = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/pay")
	serverID = spiffeid.RequireFromString("spiffe://cluster.local/ns/mantlet-system/sa/mantlet-ca")
)

const agentNS, agentSA = "mantlet-system", "mantlet-agent"

// cluster is a real API server with two nodes, an agent pod on each, a
// cart pod on node1 and a pay pod on node2, and the cluster CA serving on
// loopback.
type cluster struct {
	api    *kubetest.Server
	admin  *kubernetes.Clientset
	srv    *clusterca.Server
	addr   string
	reg    *prometheus.Registry
	audit  *syncBuffer
	bundle string // the ConfigMap's bundle, as a file
	cancel context.CancelFunc
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(s.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	ctx := context.Background()
	api := kubetest.Start(ctx, t, kubetest.Options{})
	c := &cluster{api: api, admin: api.Admin(), audit: &syncBuffer{}, reg: prometheus.NewPedanticRegistry()}
	for _, ns := range []string{agentNS, "shop"} {
		if _, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, sa := range [][2]string{{agentNS, agentSA}, {agentNS, "mantlet-ca"}, {"shop", "cart"}, {"shop", "pay"}} {
		if _, err := c.admin.CoreV1().ServiceAccounts(sa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa[1]}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"node1", "node2"} {
		if _, err := c.admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c.pod(t, agentNS, "agent-1", agentSA, "node1")
	c.pod(t, agentNS, "agent-2", agentSA, "node2")
	c.pod(t, "shop", "cart-1", "cart", "node1")
	c.pod(t, "shop", "pay-1", "pay", "node2")

	sctx, cancel := context.WithCancel(ctx)
	c.cancel = cancel
	srv, err := clusterca.New(sctx, clusterca.Config{
		Client: c.admin, Namespace: agentNS, TrustDomain: td, Intermediate: true,
		Agents: []string{agentNS + "/" + agentSA}, SVIDTTL: time.Hour, ServerID: serverID,
		DNSNames: []string{"mantlet-ca.mantlet-system.svc"}, Replica: "ca-0", Audit: c.audit,
		ReloadEvery: 100 * time.Millisecond,
		Logger:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	c.srv = srv
	c.reg.MustRegister(srv.Collector())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.addr = ln.Addr().String()
	done := make(chan error, 1)
	go func() { done <- srv.Run(sctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for ok, why := srv.Ready(); !ok; ok, why = srv.Ready() {
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %s", why)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cm, err := c.admin.CoreV1().ConfigMaps(agentNS).Get(ctx, clusterca.DefaultBundleConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the bundle's ConfigMap: %v", err)
	}
	c.bundle = filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(c.bundle, []byte(cm.Data[clusterca.BundleKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	// As a kubelet keeps a mounted ConfigMap current (there, within a
	// minute or so). It stops before its folder is removed (cleanups run
	// last registered first).
	kctx, stopKubelet := context.WithCancel(sctx)
	kubeletDone := make(chan struct{})
	t.Cleanup(func() { stopKubelet(); <-kubeletDone })
	go func() {
		defer close(kubeletDone)
		for kctx.Err() == nil {
			time.Sleep(200 * time.Millisecond)
			if cm, err := c.admin.CoreV1().ConfigMaps(agentNS).Get(kctx, clusterca.DefaultBundleConfigMap, metav1.GetOptions{}); err == nil {
				tmp := c.bundle + ".new"
				if os.WriteFile(tmp, []byte(cm.Data[clusterca.BundleKey]), 0o644) == nil {
					os.Rename(tmp, c.bundle)
				}
			}
		}
	}()
	return c
}

// pod creates a running pod, scheduled on node, as a kubelet would have
// it.
func (c *cluster) pod(t *testing.T, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	p, err := c.admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "c", Image: "registry.example/app"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	if p, err = c.admin.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// token mints a token for sa, bound to pod (when not empty), for
// audience: what a kubelet projects into the agent's pod.
func (c *cluster) token(t *testing.T, ns, sa, pod, audience string) string {
	t.Helper()
	ttl := int64(3600)
	tr := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: &ttl}}
	if pod != "" {
		p, err := c.admin.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		tr.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod, UID: p.UID}
	}
	tr, err := c.admin.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, tr, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// expired re-signs token, with the API server's own signing key, as one
// that expired a minute ago.
func (c *cluster) expired(t *testing.T, token string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	now := time.Now().Unix()
	claims["iat"], claims["nbf"], claims["exp"] = now-3600, now-3600, now-60
	payload, _ = json.Marshal(claims)
	keyPEM, err := os.ReadFile(filepath.Join(c.api.Dir(), "sa.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(keyPEM)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	signed := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload)
	sum := sha256.Sum256([]byte(signed))
	r, s, err := ecdsa.Sign(rand.Reader, k.(*ecdsa.PrivateKey), sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := append(pad32(r), pad32(s)...)
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

func pad32(n *big.Int) []byte {
	b := n.Bytes()
	return append(make([]byte, 32-len(b)), b...)
}

// client is an agent's client with token.
func (c *cluster) client(t *testing.T, token string) *clusterca.Client {
	t.Helper()
	f := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(f, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	cl, err := clusterca.NewClient(clusterca.ClientConfig{Addr: c.addr, TrustDomain: td, ServerID: serverID, TokenFile: f, BundleFile: c.bundle})
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

func csr(t *testing.T, uris ...string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// requests reads mantlet_ca_sign_requests_total by reason.
func (c *cluster) requests(t *testing.T) map[string]float64 {
	t.Helper()
	mfs, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "mantlet_ca_sign_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			out[label(m, "reason")] = m.GetCounter().GetValue()
		}
	}
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestNodeAuthorizationMatrix: the cluster CA signs an agent's request
// only for an identity of a pod running on the agent's node, proved by a
// token bound to the agent's pod for the CA's audience; every refusal
// has its reason, its metric and its audit line.
func TestNodeAuthorizationMatrix(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	agent1 := c.token(t, agentNS, agentSA, "agent-1", clusterca.DefaultAudience)

	// A pod that will be deleted, and its agent.
	c.pod(t, agentNS, "agent-3", agentSA, "node1")
	deletedAgent := c.token(t, agentNS, agentSA, "agent-3", clusterca.DefaultAudience)
	if err := c.admin.CoreV1().Pods(agentNS).Delete(ctx, "agent-3", deleteNow); err != nil {
		t.Fatal(err)
	}
	cartPodToken := c.token(t, "shop", "cart", "cart-1", clusterca.DefaultAudience)

	for _, tc := range []struct {
		name     string
		token    string
		id       spiffeid.ID
		csr      []byte
		want     clusterca.Reason
		wantNode string // caller_node in the audit line
		wantMsg  string
	}{
		{"an identity of a pod on the agent's node is signed", agent1, cartID, csr(t), clusterca.ReasonNone, "node1", ""},
		{"an identity of a pod on another node is refused", agent1, payID, csr(t), clusterca.ReasonNoPodOnNode, "node1",
			"no running pod of namespace shop with service account pay is scheduled on node node1"},
		{"a token of another audience is refused", c.token(t, agentNS, agentSA, "agent-1", kubetest.Issuer), cartID, csr(t), clusterca.ReasonUnauthenticated, "", "token for audience mantlet-ca refused"},
		{"an expired token is refused", c.expired(t, agent1), cartID, csr(t), clusterca.ReasonUnauthenticated, "", "token for audience mantlet-ca refused"},
		{"a token of a deleted pod is refused", deletedAgent, cartID, csr(t), clusterca.ReasonUnauthenticated, "", "invalidated"},
		{"a token bound to no pod is refused", c.token(t, agentNS, agentSA, "", clusterca.DefaultAudience), cartID, csr(t), clusterca.ReasonNotBound, "", "not bound to a pod on a node"},
		{"a workload's own token is not an agent's", cartPodToken, cartID, csr(t), clusterca.ReasonNotAgent, "node1", "service account shop/cart is not a node agent's"},
		{"an identity of a foreign trust domain is refused", agent1, spiffeid.RequireFromString("spiffe://other.td/ns/shop/sa/cart"), csr(t), clusterca.ReasonForeignTrustDomain, "node1", "not in trust domain cluster.local"},
		{"a CSR with two URI SANs is refused", agent1, cartID, csr(t, cartID.String(), payID.String()), clusterca.ReasonBadCSR, "node1", "asks for other names"},
		{"a CSR naming another identity is refused", agent1, cartID, csr(t, payID.String()), clusterca.ReasonBadCSR, "node1", "asks for other names"},
		{"an ID that names no workload is refused", agent1, spiffeid.RequireFromString("spiffe://cluster.local/vm/db"), csr(t), clusterca.ReasonNotWorkloadID, "node1", "not a workload identity"},
		{"no token is refused", "", cartID, csr(t), clusterca.ReasonNoToken, "", "no bearer token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := c.requests(t)[tc.want.String()]
			chain, err := c.client(t, tc.token).SignCSR(ctx, tc.csr, tc.id, time.Hour)
			var refused *clusterca.RefusedError
			switch {
			case tc.want == clusterca.ReasonNone && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want == clusterca.ReasonNone:
				if got, _ := x509svid.IDFromCert(chain[0]); got != tc.id {
					t.Fatalf("signed %s, want %s", got, tc.id)
				}
			case !errors.As(err, &refused) || refused.Reason != tc.want || !strings.Contains(refused.Message, tc.wantMsg):
				t.Fatalf("SignCSR = %v; want refused (%s) saying %q", err, tc.want, tc.wantMsg)
			}
			if got := c.requests(t)[tc.want.String()]; got != before+1 {
				t.Errorf("mantlet_ca_sign_requests_total{reason=%q} went from %v to %v, want +1", tc.want, before, got)
			}
			line := lastAudit(t, c)
			if line["reason"] != tc.want.String() || line["requested_id"] != tc.id.String() || str(line["caller_node"]) != tc.wantNode ||
				line["type"] != "mantlet.ca.sign" || line["replica"] != "ca-0" {
				t.Errorf("audit line %v; want reason %s, requested_id %s, caller_node %q", line, tc.want, tc.id, tc.wantNode)
			}
			wantVerdict := "refused"
			if tc.want == clusterca.ReasonNone {
				wantVerdict = "signed"
				if line["serial"] != chain[0].SerialNumber.Text(16) || line["caller_pod"] != "mantlet-system/agent-1" {
					t.Errorf("audit line of a signed SVID: %v", line)
				}
			}
			if line["verdict"] != wantVerdict {
				t.Errorf("audit verdict %v, want %s", line["verdict"], wantVerdict)
			}
		})
	}

	t.Run("a deleted pod's identity is no longer issued", func(t *testing.T) {
		cl := c.client(t, agent1)
		if _, err := cl.SignCSR(ctx, csr(t), cartID, time.Hour); err != nil {
			t.Fatal(err)
		}
		if err := c.admin.CoreV1().Pods("shop").Delete(ctx, "cart-1", deleteNow); err != nil {
			t.Fatal(err)
		}
		waitRefused(t, cl, cartID, clusterca.ReasonNoPodOnNode)
		c.pod(t, "shop", "cart-1", "cart", "node1")
		waitSigned(t, cl, cartID)
	})

	t.Run("an agent whose pod was deleted is refused at once, though its token review is cached", func(t *testing.T) {
		c.pod(t, agentNS, "agent-4", agentSA, "node1")
		cl := c.client(t, c.token(t, agentNS, agentSA, "agent-4", clusterca.DefaultAudience))
		waitSigned(t, cl, cartID)
		if err := c.admin.CoreV1().Pods(agentNS).Delete(ctx, "agent-4", deleteNow); err != nil {
			t.Fatal(err)
		}
		waitRefused(t, cl, cartID, clusterca.ReasonAgentPodGone)
	})

	t.Run("a request body that is no sign request is refused", func(t *testing.T) {
		before := c.requests(t)["bad_request"]
		for _, body := range []string{"", "{", `{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart"}`, `{"spiffe_id":"x","csr":"AAAA"}`,
			`{"spiffe_id":"spiffe://cluster.local/ns/shop/sa/cart","csr":"AAAA","extra":1}`, strings.Repeat(" ", clusterca.MaxRequestBytes+1)} {
			status, reason := postRaw(t, c, agent1, body)
			if status != 400 || reason != "bad_request" {
				t.Errorf("body %.40q: %d %s; want 400 bad_request", body, status, reason)
			}
		}
		if got := c.requests(t)["bad_request"]; got != before+6 {
			t.Errorf("bad_request counted %v times, want 6", got-before)
		}
	})
}

// now deletes at once, as the kubelet does once a pod's containers
// stopped (without a kubelet, a graceful deletion never ends).
var deleteNow = metav1.DeleteOptions{GracePeriodSeconds: new(int64)}

func str(v any) string {
	s, _ := v.(string)
	return s
}

func lastAudit(t *testing.T, c *cluster) map[string]any {
	t.Helper()
	lines := c.audit.lines()
	if len(lines) == 0 {
		t.Fatal("no audit line")
	}
	return lines[len(lines)-1]
}

func waitRefused(t *testing.T, cl *clusterca.Client, id spiffeid.ID, want clusterca.Reason) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := cl.SignCSR(context.Background(), csr(t), id, time.Hour)
		var refused *clusterca.RefusedError
		if errors.As(err, &refused) && refused.Reason == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("SignCSR(%s) = %v, want refused (%s) within 10s", id, err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitSigned(t *testing.T, cl *clusterca.Client, id spiffeid.ID) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := cl.SignCSR(context.Background(), csr(t), id, time.Hour)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("SignCSR(%s) = %v, want signed within 10s", id, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// postRaw sends body to the sign endpoint; the server's certificate is
// not checked (the body is what is tested).
func postRaw(t *testing.T, c *cluster, token, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	req, err := http.NewRequest(http.MethodPost, "https://"+c.addr+clusterca.SignPath, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e clusterca.ErrorResponse
	_ = json.NewDecoder(resp.Body).Decode(&e)
	return resp.StatusCode, e.Reason
}

// TestAgentsManagerGetsSVIDsAndFollowsARotationOfTheSecret runs the
// identity Manager of an agent on node1 over the client: it gets the SVID
// of its pod's identity; a rotation made in the Secret reaches its bundle,
// then its SVID is renewed under the new root.
func TestAgentsManagerGetsSVIDsAndFollowsARotationOfTheSecret(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	cl := c.client(t, c.token(t, agentNS, agentSA, "agent-1", clusterca.DefaultAudience))
	m := identity.NewManager(cl, td, slog.New(slog.DiscardHandler), identity.ManagerOptions{
		TTL: time.Hour, BundleRefresh: 50 * time.Millisecond, ReissueSpread: 100 * time.Millisecond})
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go m.Run(mctx)
	svid, err := m.SVID(ctx, cartID)
	if err != nil {
		t.Fatal(err)
	}
	if time.Until(svid.Certificates[0].NotAfter) > time.Hour {
		t.Errorf("SVID lives %v, want at most the service's hour", time.Until(svid.Certificates[0].NotAfter))
	}
	first := m.Certificates()[0].Root
	if first != identity.Fingerprint(c.srv.CA().Root()) {
		t.Fatalf("SVID under root %s, the service signs under %s", first, identity.Fingerprint(c.srv.CA().Root()))
	}

	prepared, err := clusterca.RotateSecret(ctx, c.admin, agentNS, clusterca.DefaultSecretName, (*ca.CA).Prepare)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the agent trusts the prepared root", func() bool {
		b := m.Bundles()[0]
		return len(b.Roots) == 2
	})
	// The ConfigMap follows too.
	waitUntil(t, "the ConfigMap carries both roots", func() bool {
		cm, err := c.admin.CoreV1().ConfigMaps(agentNS).Get(ctx, clusterca.DefaultBundleConfigMap, metav1.GetOptions{})
		return err == nil && strings.Count(cm.Data[clusterca.BundleKey], "BEGIN CERTIFICATE") == 2
	})
	if m.Certificates()[0].Root != first {
		t.Fatal("the SVID was renewed before the new root signs")
	}
	if _, err := clusterca.RotateSecret(ctx, c.admin, agentNS, clusterca.DefaultSecretName, (*ca.CA).Activate); err != nil {
		t.Fatal(err)
	}
	want := identity.Fingerprint(prepared.NextRoot())
	waitUntil(t, "the SVID renewed under the new root", func() bool { return m.Certificates()[0].Root == want })
	if _, err := clusterca.RotateSecret(ctx, c.admin, agentNS, clusterca.DefaultSecretName, (*ca.CA).Finish); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the old root leaves the agent's bundle", func() bool {
		b := m.Bundles()[0]
		return len(b.Roots) == 1 && b.Roots[0].Fingerprint == want
	})
	// The client still reaches the service (its certificate was renewed
	// under the new root too).
	if _, err := cl.SignCSR(ctx, csr(t), cartID, time.Hour); err != nil {
		t.Fatalf("after the rotation: %v", err)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReplicasShareOneCA: a second replica started against the same API
// loads the Secret the first made, and either one signs.
func TestReplicasShareOneCA(t *testing.T) {
	c := startCluster(t)
	second, err := clusterca.New(context.Background(), clusterca.Config{Client: c.admin, Namespace: agentNS, TrustDomain: td,
		Agents: []string{agentNS + "/" + agentSA}, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	if !second.CA().Root().Equal(c.srv.CA().Root()) {
		t.Fatal("the second replica made its own CA")
	}
	ctx, cancel := context.WithCancel(context.Background())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- second.Run(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	token := c.token(t, agentNS, agentSA, "agent-1", clusterca.DefaultAudience)
	first := c.client(t, token)
	c.addr = ln.Addr().String()
	other := c.client(t, token)
	waitSigned(t, other, cartID)
	waitSigned(t, first, cartID)
}

// TestReplicasStartingTogetherAgreeOnOneCA: replicas that start at once
// with no Secret race to create it; every one ends with the winner's CA.
func TestReplicasStartingTogetherAgreeOnOneCA(t *testing.T) {
	c := startCluster(t)
	const n = 4
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	roots := make([]*x509.Certificate, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := clusterca.New(context.Background(), clusterca.Config{Client: c.admin, Namespace: agentNS, TrustDomain: td,
				SecretName: "race-ca", BundleConfigMap: "race-bundle", Agents: []string{agentNS + "/" + agentSA}, ServerID: serverID, Logger: log})
			if errs[i] = err; err == nil {
				roots[i] = s.CA().Root()
			}
		})
	}
	wg.Wait()
	logs.mu.Lock()
	created := strings.Count(logs.b.String(), "created a CA")
	logs.mu.Unlock()
	if created != 1 {
		t.Errorf("%d replicas say they created the CA, want 1", created)
	}
	sec, err := c.admin.CoreV1().Secrets(agentNS).Get(context.Background(), "race-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stored, err := ca.Parse(ca.Files(sec.Data), ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if !roots[i].Equal(stored.Root()) {
			t.Errorf("replica %d uses root %s, the Secret holds %s", i, identity.Fingerprint(roots[i]), identity.Fingerprint(stored.Root()))
		}
	}
}

// flakyProxy forwards TCP to target until down, and again after up.
type flakyProxy struct {
	addr, target string
	mu           sync.Mutex
	ln           net.Listener
	conns        []net.Conn
}

func (p *flakyProxy) up(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.ln, p.addr = ln, ln.Addr().String()
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, s)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(s, c); s.Close() }()
			go func() { _, _ = io.Copy(c, s); c.Close() }()
		}
	}()
}

func (p *flakyProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ln.Close()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestAnAgentKeepsItsSVIDsWhileTheCAIsUnreachable: with the service
// unreachable, the agent's Manager keeps serving the SVID it holds, its
// renewals fail with the reason in Certificates (what 'mantlet certs' and
// the metrics show) and are retried; once the service is back, the SVID
// is renewed.
func TestAnAgentKeepsItsSVIDsWhileTheCAIsUnreachable(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	proxy := &flakyProxy{addr: "127.0.0.1:0", target: c.addr}
	proxy.up(t)
	t.Cleanup(proxy.down)
	c.addr = proxy.addr
	cl := c.client(t, c.token(t, agentNS, agentSA, "agent-1", clusterca.DefaultAudience))
	m := identity.NewManager(cl, td, slog.New(slog.DiscardHandler), identity.ManagerOptions{
		TTL: 16 * time.Second, Jitter: -1, MinBackoff: 100 * time.Millisecond, MaxBackoff: 400 * time.Millisecond})
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go m.Run(mctx)
	first, err := m.SVID(ctx, cartID)
	if err != nil {
		t.Fatal(err)
	}
	proxy.down()
	waitUntil(t, "a failed renewal, reported", func() bool {
		ci := m.Certificates()
		return len(ci) == 1 && ci[0].Failures > 0 && ci[0].LastError != ""
	})
	held, err := m.SVID(ctx, cartID)
	if err != nil || held.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 {
		t.Fatalf("while the CA is unreachable: %v (serial %v), want the SVID held (serial %v)", err, held, first.Certificates[0].SerialNumber)
	}
	t.Logf("while unreachable: %d failures, last: %s", m.Certificates()[0].Failures, m.Certificates()[0].LastError)
	proxy.up(t)
	waitUntil(t, "the SVID renewed once the CA is back", func() bool {
		ci := m.Certificates()
		return len(ci) == 1 && ci[0].Failures == 0 && ci[0].Serial != first.Certificates[0].SerialNumber.Text(16)
	})
}
