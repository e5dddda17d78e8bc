//go:build linux

package kubetest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/proc"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// runDirs lists the run folders in $TMPDIR.
func runDirs(t *testing.T) map[string]bool {
	t.Helper()
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), runDirPattern))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, d := range dirs {
		m[d] = true
	}
	return m
}

var (
	startedMu sync.Mutex
	started   []*Server
)

// TestMain runs the helper client when a test started the binary as one
// (see kubetest_linux_test.go), and otherwise fails the run if a server of
// this package left a process or a file behind.
func TestMain(m *testing.M) {
	if path := os.Getenv(helperEnv); path != "" {
		os.Exit(helperClient(path))
	}
	code := m.Run()
	startedMu.Lock()
	defer startedMu.Unlock()
	for _, s := range started {
		if err := leftBehind(s); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// start starts a server for t and records it for the leak check.
func start(t *testing.T, opts Options) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), DefaultReadyTimeout+time.Minute)
	defer cancel()
	s := Start(ctx, t, opts)
	startedMu.Lock()
	started = append(started, s)
	startedMu.Unlock()
	return s
}

// leftBehind reports a process or a file of a stopped server.
func leftBehind(s *Server) error {
	if _, err := os.Stat(s.Dir()); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("kubetest: %s is still there after Stop (%v)", s.Dir(), err)
	}
	for _, p := range []*proc.Process{s.etcd, s.apiserver} {
		if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kubetest: %s (pid %d) still runs after Stop (kill 0: %v)", p.Name, p.Pid(), err)
		}
	}
	return nil
}

func TestAdminWritesAPodsNodeAndIPAsAKubeletWould(t *testing.T) {
	s := start(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := s.Admin()

	v, err := c.Discovery().ServerVersion()
	if err != nil || v.GitVersion != "v1.37.2" {
		t.Errorf("server version %+v, %v; want v1.37.2", v, err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}
	if _, err := c.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "buyer", Namespace: "shop"}}
	if _, err := c.CoreV1().ServiceAccounts("shop").Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account: %v", err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "client", Namespace: "shop", Labels: map[string]string{"app": "client"}},
		Spec: corev1.PodSpec{
			NodeName:           "node1", // no scheduler: the test places it
			ServiceAccountName: "buyer",
			Containers:         []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
		},
	}
	pod, err = c.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod: %v", err)
	}
	if pod.Spec.NodeName != "node1" || pod.Spec.ServiceAccountName != "buyer" || len(pod.Spec.Volumes) != 0 {
		t.Errorf("pod as stored: node %q, service account %q, volumes %v; want node1, buyer, none (no ServiceAccount admission)",
			pod.Spec.NodeName, pod.Spec.ServiceAccountName, pod.Spec.Volumes)
	}

	// Status written with the pod itself is ignored: it belongs to the
	// status subresource, which is what a kubelet writes.
	pod.Status.PodIP = "198.19.1.11"
	if pod, err = c.CoreV1().Pods("shop").Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update pod: %v", err)
	}
	if pod.Status.PodIP != "" {
		t.Errorf("an update of the pod itself set status.podIP to %q", pod.Status.PodIP)
	}
	pod.Status = corev1.PodStatus{
		Phase:  corev1.PodRunning,
		HostIP: "198.18.0.1", HostIPs: []corev1.HostIP{{IP: "198.18.0.1"}},
		PodIP: "198.19.1.11", PodIPs: []corev1.PodIP{{IP: "198.19.1.11"}},
	}
	if _, err := c.CoreV1().Pods("shop").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update pod status: %v", err)
	}
	got, err := c.CoreV1().Pods("shop").Get(ctx, "client", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod: %v", err)
	}
	if got.Status.PodIP != "198.19.1.11" || got.Status.HostIP != "198.18.0.1" || got.Status.Phase != corev1.PodRunning || got.Spec.NodeName != "node1" {
		t.Errorf("pod reads back with node %q, podIP %q, hostIP %q, phase %q; want node1, 198.19.1.11, 198.18.0.1, Running",
			got.Spec.NodeName, got.Status.PodIP, got.Status.HostIP, got.Status.Phase)
	}
	// A field selector on spec.nodeName, as an agent watches its node's pods.
	list, err := c.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=node1"})
	if err != nil || len(list.Items) != 1 || list.Items[0].Name != "client" {
		t.Errorf("pods of node1: %v, %v; want the one pod", list, err)
	}
}

func TestServiceAccountTokensAreAuthorizedByRBAC(t *testing.T) {
	s := start(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	token, err := s.ServiceAccountToken(ctx, "mantlet-system", "agent")
	if err != nil {
		t.Fatal(err)
	}
	sa, err := kubernetes.NewForConfig(s.TokenConfig(token))
	if err != nil {
		t.Fatal(err)
	}

	// The token authenticates, as the service account.
	review, err := sa.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("self subject review with the token: %v", err)
	}
	if u := review.Status.UserInfo.Username; u != "system:serviceaccount:mantlet-system:agent" {
		t.Errorf("the token authenticates as %q, want system:serviceaccount:mantlet-system:agent", u)
	}
	// A token with another signature does not.
	forged, err := kubernetes.NewForConfig(s.TokenConfig(token[:len(token)-6] + "AAAAAA"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := forged.CoreV1().Pods("mantlet-system").List(ctx, metav1.ListOptions{}); !apierrors.IsUnauthorized(err) {
		t.Errorf("a forged token: %v, want 401 Unauthorized", err)
	}

	// Nothing is granted yet: 403.
	_, err = sa.CoreV1().Pods("mantlet-system").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("listing pods before any grant: %v, want 403 Forbidden", err)
	}
	if !strings.Contains(err.Error(), `User "system:serviceaccount:mantlet-system:agent" cannot list resource "pods"`) {
		t.Errorf("the 403 does not name the account and the verb: %v", err)
	}

	c := s.Admin()
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "pod-reader", Namespace: "mantlet-system"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}}},
	}
	if _, err := c.RbacV1().Roles("mantlet-system").Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role: %v", err)
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "agent-reads-pods", Namespace: "mantlet-system"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "pod-reader"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "agent", Namespace: "mantlet-system"}},
	}
	if _, err := c.RbacV1().RoleBindings("mantlet-system").Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role binding: %v", err)
	}

	// The authorizer learns of the binding through its informers: poll.
	deadline := time.Now().Add(time.Minute)
	for {
		_, err = sa.CoreV1().Pods("mantlet-system").List(ctx, metav1.ListOptions{})
		if err == nil {
			break
		}
		if !apierrors.IsForbidden(err) || time.Now().After(deadline) {
			t.Fatalf("listing pods after the role binding: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Only what the role grants: not another verb, not another namespace.
	err = sa.CoreV1().Pods("mantlet-system").Delete(ctx, "anything", metav1.DeleteOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("delete, which the role does not grant: %v, want 403 Forbidden", err)
	}
	if _, err := sa.CoreV1().Pods("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list in another namespace: %v, want 403 Forbidden", err)
	}
}

func TestStopRemovesEveryProcessAndFile(t *testing.T) {
	s := start(t, Options{})
	dir := s.Dir()
	pids := []int{s.etcd.Pid(), s.apiserver.Pid()}
	for _, name := range []string{caFile, servingKeyFile, saKeyFile, "etcd.sock", "etcd.log", "kube-apiserver-1.log"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("a running server lacks %s: %v", name, err)
		}
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := leftBehind(s); err != nil {
		t.Error(err)
	}
	if err := s.Stop(); err != nil {
		t.Errorf("a second Stop: %v", err)
	}
	for _, pid := range pids {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); err == nil {
			t.Errorf("pid %d is still there: %q", pid, b)
		}
	}
}

func TestAFailedStartSaysWhyAndLeavesNothing(t *testing.T) {
	bin := RequireBinaries(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	// A private TMPDIR: other test binaries may be starting their own
	// servers (run folders) at the same time.
	t.Setenv("TMPDIR", t.TempDir())
	before := runDirs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	port := uint16(taken.Addr().(*net.TCPAddr).Port)
	s, err := Launch(ctx, Options{Binaries: &bin, Port: port})
	if err == nil {
		s.Stop()
		t.Fatalf("Launch on a port in use (%d) succeeded", port)
	}
	if !strings.Contains(err.Error(), "kube-apiserver exited") || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("the error does not say that kube-apiserver exited because the port is in use: %v", err)
	}
	for d := range runDirs(t) {
		if !before[d] {
			t.Errorf("the failed start left %s", d)
		}
	}
}
