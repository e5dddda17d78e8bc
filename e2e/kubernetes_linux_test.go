package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// crdFile is the generated MeshPolicy CRD (make generate).
const crdFile = "../deploy/charts/mantlet/crds/mantlet.io_meshpolicies.yaml"

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// kubeMesh is a mesh whose agents read the cluster from a real API server
// in the testbed's control plane, over the node network.
type kubeMesh struct {
	*meshtest.Mesh
	api *kubetest.Server
	dyn dynamic.Interface
	// services are the Services as the API server made them.
	services map[string]*corev1.Service
}

// startKubeMesh starts the testbed, the API server in its control plane
// (with the MeshPolicy CRD and the agents' RBAC), loads the testbed's
// cluster into it, and starts the agents in Kubernetes mode with a
// service account token.
func startKubeMesh(t *testing.T, spec testbed.Spec) *kubeMesh {
	t.Helper()
	privtest.Require(t)
	kubetest.RequireBinaries(t)
	spec.ControlPlane = true
	km := &kubeMesh{services: map[string]*corev1.Service{}}
	km.Mesh = startMesh(t, spec, meshtest.Options{Cluster: func(ctx context.Context, m *meshtest.Mesh) ([]string, error) {
		api, err := kubetest.Launch(ctx, kubetest.Options{ControlPlane: m.TB.ControlPlane(), Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = api.Stop() })
		km.api = api
		if km.dyn, err = dynamic.NewForConfig(api.AdminConfig()); err != nil {
			return nil, err
		}
		if err := installCRD(ctx, km.dyn); err != nil {
			return nil, err
		}
		if err := agentRBAC(ctx, api.Admin()); err != nil {
			return nil, err
		}
		svcs, err := api.Load(ctx, m.TB.Manifest())
		if err != nil {
			return nil, err
		}
		for _, s := range svcs {
			km.services[s.Namespace+"/"+s.Name] = s
		}
		token, err := api.ServiceAccountToken(ctx, "mantlet-system", "mantlet-agent")
		if err != nil {
			return nil, err
		}
		kc, err := api.Kubeconfig(token)
		if err != nil {
			return nil, err
		}
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := os.WriteFile(path, kc, 0o600); err != nil {
			return nil, err
		}
		return []string{"--kubeconfig", path}, nil
	}})
	return km
}

// installCRD creates the MeshPolicy CRD and waits until it is served.
func installCRD(ctx context.Context, dyn dynamic.Interface) error {
	raw, err := os.ReadFile(crdFile)
	if err != nil {
		return fmt.Errorf("the MeshPolicy CRD (make generate): %w", err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(raw, &obj); err != nil {
		return fmt.Errorf("%s: %w", crdFile, err)
	}
	u := &unstructured.Unstructured{Object: obj}
	if _, err := dyn.Resource(crdGVR).Create(ctx, u, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create the MeshPolicy CRD: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := dyn.Resource(crdGVR).Get(ctx, u.GetName(), metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
			for _, c := range conds {
				if m, ok := c.(map[string]any); ok && m["type"] == "Established" && m["status"] == "True" {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the MeshPolicy CRD is not established after 30 s (%v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// agentRBAC gives the agents' service account what they read and write.
func agentRBAC(ctx context.Context, c kubernetes.Interface) error {
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "mantlet-agent"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"namespaces", "pods", "nodes", "services"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"mantlet.io"}, Resources: []string{"meshpolicies"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"mantlet.io"}, Resources: []string{"meshpolicies/status"}, Verbs: []string{"patch"}},
		{APIGroups: []string{""}, Resources: []string{"pods/status"}, Verbs: []string{"patch"}},
	}}
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return err
	}
	bind := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "mantlet-agent"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "mantlet-agent"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "mantlet-system", Name: "mantlet-agent"}}}
	_, err := c.RbacV1().ClusterRoleBindings().Create(ctx, bind, metav1.CreateOptions{})
	return err
}

// TestKubernetesModeMeshesWhatTheAPISays runs the agents in Kubernetes
// mode against a real API server reached over the node network:
//   - the pods of a namespace annotated through the API are meshed (mTLS on
//     the wire, the marker never in clear), and the agents write each pod's
//     mantlet.io/Meshed condition;
//   - removing the annotation un-enrolls them (the marker then crosses in
//     clear), putting it back enrolls them again; a pod's opt-out works;
//   - a MeshPolicy applied through the API refuses what it denies, and its
//     status says Accepted; one the agent finds invalid gets Invalid with
//     the reason;
//   - a Service's ClusterIP reaches its meshed endpoints and spreads
//     connections across them;
//   - the agents' service account is refused what it was not granted.
func TestKubernetesModeMeshesWhatTheAPISays(t *testing.T) {
	km := startKubeMesh(t, testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server", Labels: map[string]string{"app": "web"}},
				{Name: "server2", Namespace: "shop", ServiceAccount: "server", Labels: map[string]string{"app": "web"}},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
		Services:   []testbed.ServiceSpec{{Name: "web", Namespace: "shop", Selector: map[string]string{"app": "web"}, Ports: []testbed.ServicePort{{Port: 80, TargetPort: appPort}}}},
	})
	ctx := context.Background()
	admin := km.api.Admin()
	srv := echo(t, km.Mesh, "server", appPort)
	srv2 := echo(t, km.Mesh, "server2", appPort)

	// Meshed: only TLS crosses, and the pods say so.
	marker := newMarker(t)
	stop := capture(t, km.Mesh)
	ping(t, dial(t, km.Mesh, "client", srv.Addr), marker)
	if pkts := stop(); testbed.Contains(pkts, []byte(marker)) {
		t.Error("a meshed pod's marker crossed the underlay in clear")
	}
	waitFor(t, "the client pod's Meshed condition", func() (bool, string) {
		p, err := admin.CoreV1().Pods("shop").Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, c := range p.Status.Conditions {
			if c.Type == mkube.ConditionMeshed {
				return c.Status == corev1.ConditionTrue, fmt.Sprintf("%+v", c)
			}
		}
		return false, "no condition"
	})

	// The annotation removed through the API: not meshed any more.
	setNSAnnotations(t, admin, "shop", nil)
	km.waitEnrolled(t, 0)
	marker = newMarker(t)
	stop = capture(t, km.Mesh)
	ping(t, dial(t, km.Mesh, "client", srv.Addr), marker)
	if pkts := stop(); !testbed.Contains(pkts, []byte(marker)) {
		t.Error("with the namespace opted out, the marker did not cross in clear")
	}
	setNSAnnotations(t, admin, "shop", meshedNS)
	km.waitEnrolled(t, 3)

	// A pod opts out.
	setPodAnnotations(t, admin, "shop", "client", map[string]string{meshed: "disabled"})
	waitFor(t, "node1 un-enrolling the opted-out pod", func() (bool, string) { return km.enrolled(t, "node1") == 0, "" })
	setPodAnnotations(t, admin, "shop", "client", nil)
	km.waitEnrolled(t, 3)

	// A policy through the API: DENY port 8080, then its status.
	deny := meshPolicyObject("shop", "deny-8080", map[string]any{
		"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{"8080"}}}}})
	mp := km.dyn.Resource(mkube.MeshPolicies).Namespace("shop")
	if _, err := mp.Create(ctx, deny, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create the MeshPolicy: %v", err)
	}
	waitFor(t, "the DENY policy in force", func() (bool, string) {
		c, err := km.Dial(ctx, "client", srv.Addr)
		if err != nil {
			return false, err.Error()
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		_, _ = io.WriteString(c, "x")
		n, err := c.Read(make([]byte, 1))
		return n == 0 && err != nil, fmt.Sprintf("read %d, %v", n, err)
	})
	waitFor(t, "the DENY policy's Accepted condition", func() (bool, string) {
		return policyCondition(t, mp, "deny-8080", metav1.ConditionTrue, "Accepted")
	})
	if err := mp.Delete(ctx, "deny-8080", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// One the API accepts but the agent does not: an ALLOW whose selector
	// names a label value Kubernetes forbids.
	bad := meshPolicyObject("shop", "bad-selector", map[string]any{
		"action": "ALLOW", "selector": map[string]any{"matchLabels": map[string]any{"app": "no spaces allowed"}}})
	if _, err := mp.Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		var se apierrors.APIStatus
		if errors.As(err, &se) {
			t.Logf("the API server refused the bad selector itself: %v", err)
		} else {
			t.Fatalf("create the invalid MeshPolicy: %v", err)
		}
	} else {
		waitFor(t, "the invalid policy's Invalid condition", func() (bool, string) {
			return policyCondition(t, mp, "bad-selector", metav1.ConditionFalse, "Invalid")
		})
		_ = mp.Delete(ctx, "bad-selector", metav1.DeleteOptions{})
	}

	// The Service's ClusterIP spreads across its two endpoints.
	svc := km.services["shop/web"]
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	seen := map[string]int{}
	waitFor(t, "connections to the service reaching both endpoints", func() (bool, string) {
		c, err := km.Dial(ctx, "client", vip)
		if err != nil {
			return false, err.Error()
		}
		ping(t, c, "hello")
		c.Close()
		for _, e := range []*meshtest.Echo{srv, srv2} {
			seen[e.Addr.String()] = len(e.Peers())
		}
		return seen[srv.Addr.String()] > 0 && seen[srv2.Addr.String()] > 0, fmt.Sprint(seen)
	})

	// The agents' token is refused what the chart does not grant.
	token, err := km.api.ServiceAccountToken(ctx, "mantlet-system", "mantlet-agent")
	if err != nil {
		t.Fatal(err)
	}
	as, err := kubernetes.NewForConfig(km.api.TokenConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	_, err = as.CoreV1().Secrets("shop").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("the agents' service account listing secrets: %v, want 403 Forbidden", err)
	}
}

func meshPolicyObject(namespace, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
		"metadata": map[string]any{"namespace": namespace, "name": name}, "spec": spec}}
}

func policyCondition(t *testing.T, mp dynamic.ResourceInterface, name string, status metav1.ConditionStatus, reason string) (bool, string) {
	t.Helper()
	u, err := mp.Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return false, err.Error()
	}
	raw, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	var conds []metav1.Condition
	for _, r := range raw {
		m, _ := r.(map[string]any)
		conds = append(conds, metav1.Condition{Type: fmt.Sprint(m["type"]), Status: metav1.ConditionStatus(fmt.Sprint(m["status"])),
			Reason: fmt.Sprint(m["reason"]), Message: fmt.Sprint(m["message"])})
	}
	c := meta.FindStatusCondition(conds, mkube.ConditionAccepted)
	if c == nil {
		return false, "no Accepted condition"
	}
	return c.Status == status && c.Reason == reason, fmt.Sprintf("%+v", *c)
}

func setNSAnnotations(t *testing.T, c kubernetes.Interface, ns string, ann map[string]string) {
	t.Helper()
	patch(t, func(body []byte) error {
		_, err := c.CoreV1().Namespaces().Patch(context.Background(), ns, types.MergePatchType, body, metav1.PatchOptions{})
		return err
	}, ann)
}

func setPodAnnotations(t *testing.T, c kubernetes.Interface, ns, pod string, ann map[string]string) {
	t.Helper()
	patch(t, func(body []byte) error {
		_, err := c.CoreV1().Pods(ns).Patch(context.Background(), pod, types.MergePatchType, body, metav1.PatchOptions{})
		return err
	}, ann)
}

// patch replaces the mantlet.io/mesh annotation (nil removes it).
func patch(t *testing.T, do func([]byte) error, ann map[string]string) {
	t.Helper()
	v := "null"
	if s, ok := ann[meshed]; ok {
		v = fmt.Sprintf("%q", s)
	}
	if err := do([]byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:%s}}}`, meshed, v))); err != nil {
		t.Fatal(err)
	}
}

// enrolled reads how many pods node's agent has enrolled, or -1 while it
// is not ready.
func (km *kubeMesh) enrolled(t *testing.T, node string) int {
	t.Helper()
	st, err := km.Status(context.Background(), node)
	if err != nil || !st.Ready {
		return -1
	}
	return st.Snapshot.Enrolled
}

// waitEnrolled waits until the nodes' agents have n pods enrolled in all.
func (km *kubeMesh) waitEnrolled(t *testing.T, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d pods enrolled", n), func() (bool, string) {
		got := 0
		for _, nd := range km.TB.Nodes() {
			got += km.enrolled(t, nd.Name)
		}
		return got == n, fmt.Sprintf("%d enrolled", got)
	})
}

// waitFor polls cond until it holds, for at most 30 s.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30 s (last: %s)", what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
