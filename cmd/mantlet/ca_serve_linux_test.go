package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/internal/kubetest"
)

// TestCAServeAndRotateTheSecret runs 'mantlet ca serve' against a real API
// server: it creates its Secret and publishes the bundle, answers on its
// listen address and writes an audit line on stdout for a refusal; then
// 'mantlet ca rotate --secret' takes a rotation step on the Secret and the
// running service publishes both roots.
func TestCAServeAndRotateTheSecret(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	s := kubetest.Start(ctx, t, kubetest.Options{})
	admin := s.Admin()
	const ns = "mantlet-system"
	token, err := s.ServiceAccountToken(ctx, ns, "operator")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "operator"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "operator", Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kc, err := s.Kubeconfig(token)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, kc, 0o600); err != nil {
		t.Fatal(err)
	}

	var out, errb lockedBuffer
	e := &env{stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}
	sctx, stop := context.WithCancel(ctx)
	code := make(chan int, 1)
	go func() {
		code <- run(sctx, e, []string{"ca", "serve", "--kubeconfig", kubeconfig, "--namespace", ns, "--agents", ns + "/mantlet-agent",
			"--listen", "127.0.0.1:0", "--metrics-addr", "", "--reload", "100ms", "--replica", "ca-test"})
	}()
	defer func() {
		stop()
		if c := <-code; c != 0 {
			t.Errorf("ca serve exited %d; stderr:\n%s", c, errb.String())
		}
	}()
	listenRE := regexp.MustCompile(`listen=(127\.0\.0\.1:\d+)`)
	var addr string
	for deadline := time.Now().Add(time.Minute); addr == ""; time.Sleep(20 * time.Millisecond) {
		if m := listenRE.FindStringSubmatch(errb.String()); m != nil {
			addr = m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("ca serve did not say where it listens; stderr:\n%s", errb.String())
		}
	}
	if _, err := admin.CoreV1().Secrets(ns).Get(ctx, clusterca.DefaultSecretName, metav1.GetOptions{}); err != nil {
		t.Fatalf("ca serve made no Secret: %v", err)
	}
	bundle := func() string {
		cm, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, clusterca.DefaultBundleConfigMap, metav1.GetOptions{})
		if err != nil {
			return ""
		}
		return cm.Data[clusterca.BundleKey]
	}
	dir := t.TempDir()
	bundleFile, tokenFile := filepath.Join(dir, "bundle.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(bundleFile, []byte(bundle()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte("not-a-token"), 0o600); err != nil {
		t.Fatal(err)
	}

	// An agent's request with a bad token: refused, and audited on stdout.
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	cl, err := clusterca.NewClient(clusterca.ClientConfig{Addr: addr, TrustDomain: td,
		ServerID: spiffeid.RequireFromString("spiffe://cluster.local/ns/mantlet-system/sa/mantlet-ca"), TokenFile: tokenFile, BundleFile: bundleFile})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	if _, err := cl.SignCSR(ctx, []byte{0x30}, id, time.Hour); err == nil || !strings.Contains(err.Error(), "refused (unauthenticated)") {
		t.Fatalf("a bad token: %v, want refused (unauthenticated)", err)
	}
	var line map[string]any
	sc := bufio.NewScanner(strings.NewReader(out.String()))
	for sc.Scan() {
		line = nil
		_ = json.Unmarshal(sc.Bytes(), &line)
	}
	if line["type"] != clusterca.AuditType || line["verdict"] != "refused" || line["reason"] != "unauthenticated" || line["replica"] != "ca-test" {
		t.Errorf("last audit line on stdout %v; stdout:\n%s", line, out.String())
	}

	// A rotation step on the Secret reaches the published bundle.
	var rout, rerr bytes.Buffer
	re := &env{stdout: &rout, stderr: &rerr, getenv: func(string) string { return "" }}
	if c := run(ctx, re, []string{"ca", "rotate", "--secret", ns + "/" + clusterca.DefaultSecretName, "--kubeconfig", kubeconfig, "prepare"}); c != 0 {
		t.Fatalf("ca rotate --secret prepare exited %d; stderr:\n%s", c, rerr.String())
	}
	if !strings.Contains(rout.String(), "Prepared a new root") || !strings.Contains(rout.String(), "ca rotate --secret "+ns+"/mantlet-ca --kubeconfig "+kubeconfig+" activate") {
		t.Errorf("ca rotate said:\n%s", rout.String())
	}
	for deadline := time.Now().Add(30 * time.Second); strings.Count(bundle(), "BEGIN CERTIFICATE") != 2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the published bundle did not get the prepared root:\n%s", bundle())
		}
	}
}
