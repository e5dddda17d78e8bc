package chart

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/internal/kubetest"
)

// TestClusterCARunsWithTheChartsRBAC installs the chart with
// ca.mode=cluster into a real API server and runs the cluster CA with its
// ServiceAccount's own token and the arguments the Deployment gives it:
// it creates its Secret and its bundle's ConfigMap, reviews an agent's
// token and watches pods, all with the RBAC the chart grants, and signs
// an agent's request for a pod on the agent's node.
func TestClusterCARunsWithTheChartsRBAC(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	s := kubetest.Start(ctx, t, kubetest.Options{})
	admin := s.Admin()
	a := newApplier(t, s.AdminConfig())
	const ns = "mesh-system"
	vals := clusterCAValues()
	vals["createNamespace"] = true
	a.applyAll(ctx, t, render(t, Options{Release: "mesh", Namespace: ns, Values: vals}))

	caToken, err := s.ServiceAccountToken(ctx, ns, "mesh-ca")
	if err != nil {
		t.Fatal(err)
	}
	caClient, err := kubernetes.NewForConfig(s.TokenConfig(caToken))
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("mesh.example")
	serverID := spiffeid.RequireFromString("spiffe://mesh.example/ns/mesh-system/sa/mesh-ca")
	srv, err := clusterca.New(ctx, clusterca.Config{Client: caClient, Namespace: ns, TrustDomain: td, Intermediate: true,
		Agents: []string{ns + "/mesh-agent"}, ServerID: serverID, ReloadEvery: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("the CA with the chart's RBAC: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Run(rctx, ln) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// A node, the agent's pod and a workload's on it.
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	agentPod := runningPod(ctx, t, admin, ns, "mesh-agent-x", "mesh-agent", "node-1")
	runningPod(ctx, t, admin, "shop", "cart-1", "cart", "node-1")

	cm, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, "mantlet-trust-bundle", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the CA did not publish its bundle: %v", err)
	}
	if _, err := admin.CoreV1().Secrets(ns).Get(ctx, "mantlet-ca", metav1.GetOptions{}); err != nil {
		t.Fatalf("the CA did not store itself: %v", err)
	}
	dir := t.TempDir()
	bundle, tokenFile := filepath.Join(dir, "bundle.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(bundle, []byte(cm.Data[clusterca.BundleKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	ttl := int64(3600)
	tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "mesh-agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{"mantlet-ca"}, ExpirationSeconds: &ttl,
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agentPod.Name, UID: agentPod.UID}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	cl, err := clusterca.NewClient(clusterca.ClientConfig{Addr: ln.Addr().String(), TrustDomain: td, ServerID: serverID, TokenFile: tokenFile, BundleFile: bundle})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	cart := spiffeid.RequireFromString("spiffe://mesh.example/ns/shop/sa/cart")
	deadline := time.Now().Add(30 * time.Second)
	for {
		chain, err := cl.SignCSR(ctx, csr, cart, time.Hour)
		if err == nil {
			if id, _ := x509svid.IDFromCert(chain[0]); id != cart {
				t.Fatalf("signed %s, want %s", id, cart)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent's request, with the chart's RBAC: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func runningPod(ctx context.Context, t *testing.T, admin kubernetes.Interface, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "registry.example/app"}}}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	if p, err = admin.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}
