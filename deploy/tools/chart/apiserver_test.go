package chart

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/kubetest"
)

// applier server-side applies objects as 'kubectl apply --server-side'
// does, with strict field validation: a field the API server does not
// know is an error, not silently dropped.
type applier struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newApplier(t *testing.T, cfg *rest.Config) *applier {
	t.Helper()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc))}
}

// resource is where o lives.
func (a *applier) resource(o *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := o.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		a.mapper.Reset() // a CRD established since the last discovery
		m, err = a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", gvk, err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return a.dyn.Resource(m.Resource).Namespace(o.GetNamespace()), nil
	}
	return a.dyn.Resource(m.Resource), nil
}

func (a *applier) apply(ctx context.Context, o *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	ri, err := a.resource(o)
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(o.Object)
	if err != nil {
		return nil, err
	}
	force := true
	got, err := ri.Patch(ctx, o.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
		FieldManager: "mantlet-chart-test", Force: &force, FieldValidation: metav1.FieldValidationStrict})
	if err != nil {
		return nil, fmt.Errorf("apply %s %s/%s: %w", o.GetKind(), o.GetNamespace(), o.GetName(), err)
	}
	return got, nil
}

// applyAll applies objs in order and waits for each CRD to be
// established before the next object, as the objects after it may be of
// its kind.
func (a *applier) applyAll(ctx context.Context, t *testing.T, objs []*unstructured.Unstructured) []*unstructured.Unstructured {
	t.Helper()
	var out []*unstructured.Unstructured
	for _, o := range objs {
		got, err := a.apply(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		if o.GetKind() == "CustomResourceDefinition" {
			a.waitEstablished(ctx, t, o.GetName())
		}
		out = append(out, got)
	}
	return out
}

func (a *applier) waitEstablished(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	crds := a.dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	for {
		crd, err := crds.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("CRD %s: %v", name, err)
		}
		conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
		for _, c := range conds {
			if m, _ := c.(map[string]any); m["type"] == "Established" && m["status"] == "True" {
				a.mapper.Reset()
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("CRD %s not established: %v", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// readObjects parses a YAML file of objects.
func readObjects(t *testing.T, path string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(string(b))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return objs
}

// caSecret is the Secret the chart README has the user make:
// 'mantlet ca init --dir D', then 'kubectl create secret generic
// mantlet-ca --from-file=D'.
func caSecret(t *testing.T, namespace, name string) *corev1.Secret {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := ca.Init(dir, spiffeid.RequireTrustDomainFromString("cluster.local"), ca.Options{}); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name}, Data: map[string][]byte{}}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		s.Data[e.Name()] = b
	}
	return s
}

// TestChartInstallsIntoARealAPIServer applies deploy/mantlet.yaml (the
// chart with its default values) and a second release with every option
// on to a real kube-apiserver, server-side, with strict field validation:
// every object is stored as written. Nothing runs them (no kubelet): the
// DaemonSet is accepted, never scheduled. Then it checks, with the
// agent's own service-account token, that the RBAC grants what the agent
// needs and nothing more.
func TestChartInstallsIntoARealAPIServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	s := kubetest.Start(ctx, t, kubetest.Options{})
	admin := s.Admin()
	a := newApplier(t, s.AdminConfig())

	// The PodMonitor CRD stands in for the Prometheus operator's.
	a.applyAll(ctx, t, readObjects(t, filepath.Join("testdata", "podmonitor-crd.yaml")))
	crd, err := HasCRD(root)
	if err != nil {
		t.Fatal(err)
	}
	if !crd {
		t.Logf("%s does not exist yet (it is generated by controller-gen): the MeshPolicy CRD is not installed, and the agent's MeshPolicy permissions are checked by access review only", CRDFile)
	}

	// What 'kubectl apply -f deploy/mantlet.yaml' creates, CRD included.
	manifest := readObjects(t, filepath.Join(root, ManifestFile))
	a.applyAll(ctx, t, manifest)
	if _, err := admin.CoreV1().Secrets(Namespace).Create(ctx, caSecret(t, Namespace, "mantlet-ca"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ds, err := admin.AppsV1().DaemonSets(Namespace).Get(ctx, "mantlet-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := ds.Spec.Template.Spec.Containers[0]
	if sc := c.SecurityContext; sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Add) != 3 || sc.AppArmorProfile == nil {
		t.Errorf("the stored DaemonSet lost its security context: %+v", sc)
	}

	// Strict validation bites: a misspelt field is refused, not dropped.
	for _, o := range manifest {
		if o.GetKind() != "DaemonSet" {
			continue
		}
		typo := o.DeepCopy()
		if err := unstructured.SetNestedField(typo.Object, true, "spec", "template", "spec", "hostNetwrok"); err != nil {
			t.Fatal(err)
		}
		if _, err := a.apply(ctx, typo); err == nil || !strings.Contains(err.Error(), "spec.template.spec.hostNetwrok: field not declared in schema") {
			t.Errorf("a DaemonSet with a misspelt field: %v, want it refused", err)
		}
	}

	// Applying again changes nothing (an upgrade with the same values).
	// Controllers may have written status since (a CRD's conditions), so
	// the object as it is now is the reference.
	for _, o := range manifest {
		ri, err := a.resource(o)
		if err != nil {
			t.Fatal(err)
		}
		now, err := ri.Get(ctx, o.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		again, err := a.apply(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		if again.GetResourceVersion() != now.GetResourceVersion() {
			t.Errorf("applying %s %s again changed it", o.GetKind(), o.GetName())
		}
	}

	// Another release beside it, every option on: PodMonitor, dashboard,
	// privileged, hostPID.
	edge := render(t, Options{Release: "edge", Namespace: "edge-mesh", Values: nonDefault()})
	a.applyAll(ctx, t, edge)
	pm, err := a.dyn.Resource(schema.GroupVersionResource{Group: "monitoring.coreos.com", Version: "v1", Resource: "podmonitors"}).
		Namespace("edge-mesh").Get(ctx, "edge-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if eps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints"); len(eps) != 1 {
		t.Errorf("stored PodMonitor endpoints %v", eps)
	}
	cm, err := admin.CoreV1().ConfigMaps("edge-mesh").Get(ctx, "edge-grafana-dashboard", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid([]byte(cm.Data["mantlet.json"])) {
		t.Error("the stored dashboard is not JSON")
	}

	t.Run("the agent's pods pass admission", func(t *testing.T) {
		checkAgentPods(ctx, t, admin)
	})

	t.Run("the agent's account may do what the agent does and nothing else", func(t *testing.T) {
		token, err := s.ServiceAccountToken(ctx, Namespace, "mantlet-agent")
		if err != nil {
			t.Fatal(err)
		}
		agent, err := kubernetes.NewForConfig(s.TokenConfig(token))
		if err != nil {
			t.Fatal(err)
		}
		checkAccessMatrix(ctx, t, agent)
		checkAgentCalls(ctx, t, admin, agent, a.dyn, crd, s.TokenConfig(token))
	})
}

// access is one (API group, resource, subresource).
type access struct{ group, resource, sub string }

func (r access) String() string {
	s := r.resource
	if r.sub != "" {
		s += "/" + r.sub
	}
	if r.group != "" {
		s += "." + r.group
	}
	return s
}

// checkAccessMatrix asks the API server, as the agent, whether it may do
// each verb on each resource, and wants yes exactly for the reads of what
// it watches and for patching the two statuses it writes.
func checkAccessMatrix(ctx context.Context, t *testing.T, agent kubernetes.Interface) {
	reads := []access{{"", "namespaces", ""}, {"", "pods", ""}, {"", "nodes", ""}, {"", "services", ""},
		{"discovery.k8s.io", "endpointslices", ""}, {"mantlet.io", "meshpolicies", ""}}
	statuses := []access{{"", "pods", "status"}, {"mantlet.io", "meshpolicies", "status"}}
	others := []access{{"", "pods", "exec"}, {"", "pods", "log"}, {"", "pods", "eviction"}, {"", "pods", "ephemeralcontainers"},
		{"", "nodes", "status"}, {"", "nodes", "proxy"}, {"", "services", "status"}, {"", "namespaces", "status"},
		{"", "endpoints", ""}, {"", "secrets", ""}, {"", "configmaps", ""}, {"", "serviceaccounts", ""},
		{"", "serviceaccounts", "token"}, {"", "events", ""}, {"events.k8s.io", "events", ""}, {"apps", "daemonsets", ""},
		{"rbac.authorization.k8s.io", "clusterroles", ""}, {"rbac.authorization.k8s.io", "clusterrolebindings", ""},
		{"apiextensions.k8s.io", "customresourcedefinitions", ""}, {"coordination.k8s.io", "leases", ""},
		{"certificates.k8s.io", "certificatesigningrequests", ""}, {"mantlet.io", "meshpolicies", "finalizers"}}
	verbs := []string{"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
	want := func(r access, verb string) bool {
		switch {
		case slices.Contains(reads, r):
			return verb == "get" || verb == "list" || verb == "watch"
		case slices.Contains(statuses, r):
			return verb == "patch"
		}
		return false
	}
	var granted []string
	for _, r := range slices.Concat(reads, statuses, others) {
		for _, verb := range verbs {
			// All namespaces for namespaced resources, as the agent's
			// informers list and watch them.
			review, err := agent.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
				Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{
					Verb: verb, Group: r.group, Resource: r.resource, Subresource: r.sub}},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := review.Status.Allowed; got != want(r, verb) {
				t.Errorf("%s %s: allowed %v, want %v (%s)", verb, r, got, want(r, verb), review.Status.Reason)
			}
			if review.Status.Allowed {
				granted = append(granted, verb+" "+r.String())
			}
		}
	}
	t.Logf("granted: %s", strings.Join(granted, ", "))
	// With the CNI plugin: get of its own DaemonSet, and of nothing else
	// of that kind (was mantlet uninstalled, or is the agent restarting?).
	for _, tc := range []struct {
		ns, name string
		want     bool
	}{{Namespace, "mantlet-agent", true}, {Namespace, "other", false}, {"default", "mantlet-agent", false}} {
		review, err := agent.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
			Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: "get", Group: "apps", Resource: "daemonsets", Namespace: tc.ns, Name: tc.name}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if review.Status.Allowed != tc.want {
			t.Errorf("get daemonset %s/%s: allowed %v, want %v", tc.ns, tc.name, review.Status.Allowed, tc.want)
		}
	}
}

// checkAgentCalls makes the agent's calls, and some it must not make, for
// real.
func checkAgentCalls(ctx context.Context, t *testing.T, admin, agent kubernetes.Interface, adminDyn dynamic.Interface, crd bool, agentCfg *rest.Config) {
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app",
		Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "web"},
		Spec: corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: "web", Image: "registry.example/web:1"}}}}
	if _, err := admin.CoreV1().Pods("app").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Allowed: what the informers do, and a pod status condition.
	for what, call := range map[string]func() error{
		"list namespaces": func() error { _, err := agent.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); return err },
		"list pods":       func() error { _, err := agent.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); return err },
		"get a pod":       func() error { _, err := agent.CoreV1().Pods("app").Get(ctx, "web", metav1.GetOptions{}); return err },
		"list nodes":      func() error { _, err := agent.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); return err },
		"list services":   func() error { _, err := agent.CoreV1().Services("").List(ctx, metav1.ListOptions{}); return err },
		"list endpointslices": func() error {
			_, err := agent.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
			return err
		},
		"watch pods": func() error {
			w, err := agent.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{})
			if err == nil {
				w.Stop()
			}
			return err
		},
		"patch a pod's status conditions": func() error {
			patch := []byte(`{"status":{"conditions":[{"type":"mantlet.io/Enrolled","status":"True","reason":"Enrolled"}]}}`)
			_, err := agent.CoreV1().Pods("app").Patch(ctx, "web", types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
			return err
		},
	} {
		if err := call(); err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
	if crd {
		dyn, err := dynamic.NewForConfig(agentCfg)
		if err != nil {
			t.Fatal(err)
		}
		gvr := schema.GroupVersionResource{Group: "mantlet.io", Version: "v1alpha1", Resource: "meshpolicies"}
		if _, err := dyn.Resource(gvr).List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("list meshpolicies: %v", err)
		}
		checkPolicyStatus(ctx, t, adminDyn, dyn, gvr)
	}

	// Refused: writing anything else, reading Secrets (the CA's among them).
	for what, call := range map[string]func() error{
		"create a pod": func() error {
			p := pod.DeepCopy()
			p.Name = "intruder"
			_, err := agent.CoreV1().Pods("app").Create(ctx, p, metav1.CreateOptions{})
			return err
		},
		"patch a pod (not its status)": func() error {
			_, err := agent.CoreV1().Pods("app").Patch(ctx, "web", types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
			return err
		},
		"update a pod's status": func() error {
			p, err := admin.CoreV1().Pods("app").Get(ctx, "web", metav1.GetOptions{})
			if err != nil {
				return err
			}
			_, err = agent.CoreV1().Pods("app").UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		},
		"delete a pod": func() error { return agent.CoreV1().Pods("app").Delete(ctx, "web", metav1.DeleteOptions{}) },
		"list secrets": func() error { _, err := agent.CoreV1().Secrets("").List(ctx, metav1.ListOptions{}); return err },
		"get the CA": func() error {
			_, err := agent.CoreV1().Secrets(Namespace).Get(ctx, "mantlet-ca", metav1.GetOptions{})
			return err
		},
		"patch a node's status": func() error {
			_, err := agent.CoreV1().Nodes().Patch(ctx, "node-a", types.MergePatchType, []byte(`{"status":{}}`), metav1.PatchOptions{}, "status")
			return err
		},
		"list configmaps": func() error { _, err := agent.CoreV1().ConfigMaps("").List(ctx, metav1.ListOptions{}); return err },
		"list daemonsets": func() error { _, err := agent.AppsV1().DaemonSets("").List(ctx, metav1.ListOptions{}); return err },
		"annotate a namespace": func() error {
			_, err := agent.CoreV1().Namespaces().Patch(ctx, "app", types.MergePatchType, []byte(`{"metadata":{"annotations":{"mantlet.io/mesh":"disabled"}}}`), metav1.PatchOptions{})
			return err
		},
	} {
		err := call()
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s: %v, want 403 Forbidden", what, err)
		}
		var status apierrors.APIStatus
		if errors.As(err, &status) && status.Status().Code != 403 {
			t.Errorf("%s: code %d, want 403", what, status.Status().Code)
		}
	}
}

// agentPod is the pod the DaemonSet's controller would create on node-a.
func agentPod(ds *appsv1.DaemonSet) *corev1.Pod {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ds.Namespace, GenerateName: ds.Name + "-",
			Labels: ds.Spec.Template.Labels, Annotations: ds.Spec.Template.Annotations},
		Spec: *ds.Spec.Template.Spec.DeepCopy(),
	}
	pod.Spec.NodeName = "node-a"
	return pod
}

// checkAgentPods creates the DaemonSets' pods as their controller would,
// with dryRun (nothing here would run them): through admission (Pod
// Security, priority classes) and pod validation, which the DaemonSet
// itself does not meet. Two controls show those checks are on: a
// Bidirectional mount without privileges, and a namespace that enforces
// the baseline Pod Security level.
func checkAgentPods(ctx context.Context, t *testing.T, admin kubernetes.Interface) {
	dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}
	var plain *corev1.Pod
	for _, ref := range []struct{ namespace, name string }{{Namespace, "mantlet-agent"}, {"edge-mesh", "edge-agent"}} {
		ds, err := admin.AppsV1().DaemonSets(ref.namespace).Get(ctx, ref.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pod := agentPod(ds)
		if ref.namespace == Namespace {
			plain = pod
		}
		if _, err := admin.CoreV1().Pods(ref.namespace).Create(ctx, pod, dryRun); err != nil {
			t.Errorf("the pod of %s/%s: %v", ref.namespace, ref.name, err)
		}
	}

	bidi := plain.DeepCopy()
	for i, m := range bidi.Spec.Containers[0].VolumeMounts {
		if m.MountPath == "/sys/fs/bpf" {
			p := corev1.MountPropagationBidirectional
			bidi.Spec.Containers[0].VolumeMounts[i].MountPropagation = &p
		}
	}
	if _, err := admin.CoreV1().Pods(Namespace).Create(ctx, bidi, dryRun); err == nil || !strings.Contains(err.Error(), "Bidirectional") {
		t.Errorf("an unprivileged agent with bpffs Bidirectional: %v, want it refused", err)
	}

	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "baseline",
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "baseline"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	strict := plain.DeepCopy()
	strict.Namespace = "baseline"
	if _, err := admin.CoreV1().Pods("baseline").Create(ctx, strict, dryRun); err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
		t.Errorf("the agent in a namespace enforcing baseline: %v, want it refused by Pod Security", err)
	}
}

// checkPolicyStatus has the agent (agentDyn, with its token) write a
// MeshPolicy's Accepted condition as source/kubernetes does, and try to
// change and to create a policy, which it must not.
func checkPolicyStatus(ctx context.Context, t *testing.T, adminDyn, agentDyn dynamic.Interface, gvr schema.GroupVersionResource) {
	t.Helper()
	policy := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
		"metadata": map[string]any{"namespace": "app", "name": "deny-8080"},
		"spec":     map[string]any{"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{"8080"}}}}},
	}}
	if _, err := adminDyn.Resource(gvr).Namespace("app").Create(ctx, policy, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create a MeshPolicy: %v", err)
	}
	policies := agentDyn.Resource(gvr).Namespace("app")
	status := []byte(`{"status":{"conditions":[{"type":"Accepted","status":"True","reason":"Accepted","message":"in force","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}`)
	if _, err := policies.Patch(ctx, "deny-8080", types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		t.Errorf("patch a MeshPolicy's status: %v", err)
	}
	spec := []byte(`{"spec":{"action":"ALLOW"}}`)
	if _, err := policies.Patch(ctx, "deny-8080", types.MergePatchType, spec, metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("patch a MeshPolicy's spec: %v, want 403 Forbidden", err)
	}
	other := policy.DeepCopy()
	other.SetName("intruder")
	if _, err := policies.Create(ctx, other, metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("create a MeshPolicy: %v, want 403 Forbidden", err)
	}
}
