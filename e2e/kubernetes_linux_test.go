package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
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
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
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
	return startKubeMeshWith(t, spec, meshtest.Options{}, nil)
}

// startKubeMeshWith is startKubeMesh with opts, and setup, when not nil,
// called once the API server holds the testbed's objects and before any
// agent starts.
func startKubeMeshWith(t testing.TB, spec testbed.Spec, opts meshtest.Options, setup func(ctx context.Context, km *kubeMesh, m *meshtest.Mesh) error) *kubeMesh {
	t.Helper()
	privtest.Require(t)
	kubetest.RequireBinaries(t)
	spec.ControlPlane = true
	km := &kubeMesh{services: map[string]*corev1.Service{}}
	opts.Cluster = func(ctx context.Context, m *meshtest.Mesh) ([]string, error) {
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
		if err := agentRBAC(ctx, api.Admin(), km.dyn); err != nil {
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
		if setup != nil {
			if err := setup(ctx, km, m); err != nil {
				return nil, err
			}
		}
		return []string{"--kubeconfig", path}, nil
	}
	km.Mesh = startMesh(t, spec, opts)
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

// agentRBAC applies the RBAC objects of the chart's rendered manifest
// (deploy/mantlet.yaml, what `kubectl apply` users get), so the agents run
// with exactly the permissions the chart grants.
func agentRBAC(ctx context.Context, c kubernetes.Interface, dyn dynamic.Interface) error {
	raw, err := os.ReadFile(filepath.Join("..", "deploy", "mantlet.yaml"))
	if err != nil {
		return fmt.Errorf("read the chart's manifest: %w", err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mantlet-system"}}
	if _, err := c.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace mantlet-system: %w", err)
	}
	resources := map[string]string{"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings"}
	applied := 0
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
	for {
		var u unstructured.Unstructured
		if err := dec.Decode(&u.Object); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("decode the chart's manifest: %w", err)
		}
		res, ok := resources[u.GetKind()]
		if !ok || u.GroupVersionKind().Group != rbacv1.GroupName {
			continue
		}
		gvr := rbacv1.SchemeGroupVersion.WithResource(res)
		var ri dynamic.ResourceInterface = dyn.Resource(gvr)
		if u.GetNamespace() != "" {
			ri = dyn.Resource(gvr).Namespace(u.GetNamespace())
		}
		if _, err := ri.Create(ctx, &u, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create %s %s from the chart: %w", u.GetKind(), u.GetName(), err)
		}
		applied++
	}
	if applied == 0 {
		return errors.New("the chart's manifest holds no RBAC object")
	}
	return nil
}

// TestKubernetesModeMeshesWhatTheAPISays runs the agents in Kubernetes
// mode against a real API server reached over the node network:
//   - the pods of a namespace annotated through the API are meshed (mTLS on
//     the wire, the marker never in clear), and the agents write each pod's
//     mantlet.io/Meshed condition;
//   - removing the annotation un-enrolls them (the marker then crosses in
//     clear), putting it back enrolls them again; a pod's opt-out works;
//   - a MeshPolicy applied through the API refuses what it denies (and
//     only that), and its status says Accepted; an edit the agent finds
//     invalid gets Invalid with the reason while the last valid version
//     stays in force, and the nodes' status names it; a new invalid one
//     gets Invalid;
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
	other := echo(t, km.Mesh, "server", appPort+1)

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
	// The DENY names one port: the server's other port still answers.
	ping(t, dial(t, km.Mesh, "client", other.Addr), "not denied")

	// An edit the API server's schema accepts but the agent refuses (a
	// selector with a label value Kubernetes forbids) never takes the
	// DENY out of force: the last valid version stays, the condition and
	// the node's status say so.
	cur, err := mp.Get(ctx, "deny-8080", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(cur.Object, map[string]any{"matchLabels": map[string]any{"app": "no spaces allowed"}}, "spec", "selector"); err != nil {
		t.Fatal(err)
	}
	if _, err := mp.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update the MeshPolicy with a bad selector: %v", err)
	}
	waitFor(t, "the rejected edit's Invalid condition", func() (bool, string) {
		return policyCondition(t, mp, "deny-8080", metav1.ConditionFalse, "Invalid")
	})
	for _, node := range []string{"node1", "node2"} {
		waitFor(t, node+"'s status naming the rejected edit", func() (bool, string) {
			st, err := km.Status(ctx, node)
			if err != nil {
				return false, err.Error()
			}
			return st.Config.LastEditRejected && strings.Contains(strings.Join(st.Problems, "\n"), "MeshPolicy shop/deny-8080 rejected"),
				fmt.Sprintf("rejected %v, problems %q", st.Config.LastEditRejected, st.Problems)
		})
	}
	if c, err := km.Dial(ctx, "client", srv.Addr); err == nil {
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		_, _ = io.WriteString(c, "x")
		if n, _ := c.Read(make([]byte, 1)); n > 0 {
			t.Error("after an invalid edit of the DENY policy, port 8080 answers: the last valid version is not in force")
		}
		c.Close()
	}
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
	forbidden := map[string]error{}
	_, forbidden["list secrets"] = as.CoreV1().Secrets("shop").List(ctx, metav1.ListOptions{})
	_, forbidden["create a pod"] = as.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "intruder"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "x", Image: "x"}}}}, metav1.CreateOptions{})
	_, forbidden["patch a pod's spec"] = as.CoreV1().Pods("shop").Patch(ctx, "client", types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
	_, forbidden["patch a namespace"] = as.CoreV1().Namespaces().Patch(ctx, "shop", types.MergePatchType, []byte(`{"metadata":{"annotations":{"mantlet.io/mesh":"disabled"}}}`), metav1.PatchOptions{})
	asDyn, err := dynamic.NewForConfig(km.api.TokenConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	forbidden["delete a MeshPolicy"] = asDyn.Resource(mkube.MeshPolicies).Namespace("shop").Delete(ctx, "any", metav1.DeleteOptions{})
	for what, err := range forbidden {
		if !apierrors.IsForbidden(err) {
			t.Errorf("the agents' service account trying to %s: %v, want 403 Forbidden", what, err)
		}
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
