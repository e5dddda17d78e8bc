package kubernetes

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	dynfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/source/file"
)

func ns(name string, ann map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
}

func node(name, ip string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}}}
}

func pod(namespace, name, uid, nodeName, ip string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, UID: types.UID("uid-" + uid), Labels: labels,
			Annotations: map[string]string{"unrelated.example/big": strings.Repeat("x", 1000)}, ResourceVersion: "1"},
		Spec: corev1.PodSpec{NodeName: nodeName, ServiceAccountName: name,
			Containers: []corev1.Container{{Name: "app", Image: "example/app", Env: []corev1.EnvVar{{Name: "A", Value: "B"}},
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, HostIP: "198.18.0.1"},
	}
}

func meshPolicy(namespace, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
		"metadata": map[string]any{"namespace": namespace, "name": name, "uid": "uid-" + namespace + "-" + name, "generation": int64(1)},
		"spec":     spec,
	}}
}

// fixture is a source over fake clients, started.
type fixture struct {
	client *fake.Clientset
	dyn    *dynfake.FakeDynamicClient
	src    *Source
	states chan *source.State
}

func newFixture(t testing.TB, core []runtime.Object, policies ...runtime.Object) (*fixture, *source.State) {
	t.Helper()
	client := fake.NewClientset(core...)
	scheme := runtime.NewScheme()
	dyn := dynfake.NewSimpleDynamicClientWithCustomListKinds(scheme, map[schema.GroupVersionResource]string{MeshPolicies: "MeshPolicyList"}, policies...)
	src := NewForClients(client, dyn, "https://api.test", Options{Logger: slog.New(slog.NewTextHandler(t.Output(), nil)), Debounce: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	first, err := src.Initial(ctx)
	if err != nil {
		cancel()
		src.Close()
		t.Fatal(err)
	}
	f := &fixture{client: client, dyn: dyn, src: src, states: make(chan *source.State, 16)}
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(st *source.State) { f.states <- st }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return f, first
}

// next waits for the next state the source emits.
func (f *fixture) next(t *testing.T) *source.State {
	t.Helper()
	select {
	case st := <-f.states:
		return st
	case <-time.After(10 * time.Second):
		t.Fatal("no state emitted within 10 s")
		return nil
	}
}

// nothing checks that the source emits nothing for a while after a change
// it should ignore.
func (f *fixture) nothing(t *testing.T) {
	t.Helper()
	select {
	case st := <-f.states:
		t.Fatalf("a state was emitted (generation %d) for a change that means nothing", st.Generation)
	case <-time.After(300 * time.Millisecond): // many debounce periods
	}
}

var ready = true

// TestSourceReadsTheClusterAsTheFileDoes: the same objects give the same
// meaning as in a cluster file; a service resolves to its ready endpoints
// from EndpointSlices; a MeshPolicy that fails validation is left out and
// named.
func TestSourceReadsTheClusterAsTheFileDoes(t *testing.T) {
	unready := false
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "web-abc", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"198.19.1.10"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}, TargetRef: &corev1.ObjectReference{Kind: "Pod", UID: "uid-a"}},
			{Addresses: []string{"198.19.1.11"}, Conditions: discoveryv1.EndpointConditions{Ready: &unready}, TargetRef: &corev1.ObjectReference{Kind: "Pod", UID: "uid-b"}},
		},
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "198.18.128.10", Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromString("http")}}}}
	f, st := newFixture(t, []runtime.Object{
		ns("shop", map[string]string{"mantlet.io/mesh": "enabled", "mantlet.io/mtls": "STRICT"}),
		ns("plain", nil),
		node("node1", "198.18.0.1"),
		pod("shop", "a", "a", "node1", "198.19.1.10", map[string]string{"app": "web"}),
		pod("shop", "b", "b", "node1", "198.19.1.11", map[string]string{"app": "web"}),
		pod("plain", "c", "c", "node1", "198.19.1.12", nil),
		svc, slice,
	},
		meshPolicy("shop", "deny-22", map[string]any{"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{"22"}}}}}),
		meshPolicy("shop", "bad", map[string]any{"action": "MAYBE"}),
	)
	snap := st.Snapshot
	a := snap.WorkloadByIP(netip.MustParseAddr("198.19.1.10"))
	c := snap.WorkloadByIP(netip.MustParseAddr("198.19.1.12"))
	if a == nil || !a.Enrolled || a.ServiceAccount != "a" || a.Node != "node1" || c == nil || c.Enrolled {
		t.Fatalf("workloads: a=%+v c=%+v; want a meshed with its service account, c unmeshed", a, c)
	}
	_, ep, w, ok := snap.ResolveService(netip.MustParseAddrPort("198.18.128.10:80"), 0)
	if !ok || w.UID != "uid-a" || ep.Port() != 8080 {
		t.Errorf("the service resolves to %v %v (%v), want pod a (the only ready endpoint) on its named port 8080", w, ep, ok)
	}
	var names []string
	for _, p := range st.Policies {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	if strings.Join(names, " ") != "shop/deny-22 shop/mtls-annotation.mantlet.io" {
		t.Errorf("policies in force %v, want the valid one and the namespace's STRICT annotation", names)
	}
	if why := f.src.InvalidPolicies()["shop/bad"]; !strings.Contains(why, "spec.action") {
		t.Errorf("the invalid policy is reported as %q, want its field named", why)
	}
	if got := f.src.Status(); got.Kind != "kubernetes" || got.Where != "https://api.test" || got.Applied != 1 {
		t.Errorf("Status() = %+v", got)
	}
}

// TestSourceFollowsChangesAndIgnoresNoise: a pod update mantlet does not
// read emits nothing; opting a namespace out, a pod's new IP and deleting
// a pod each emit a new generation.
func TestSourceFollowsChangesAndIgnoresNoise(t *testing.T) {
	f, first := newFixture(t, []runtime.Object{
		ns("shop", map[string]string{"mantlet.io/mesh": "enabled"}),
		node("node1", "198.18.0.1"),
		pod("shop", "a", "a", "node1", "198.19.1.10", nil),
		pod("shop", "b", "b", "node1", "198.19.1.11", nil),
	})
	ctx := context.Background()
	pods := f.client.CoreV1().Pods("shop")

	p, err := pods.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.ResourceVersion = "2"
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", RestartCount: 3}}
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.nothing(t)

	n, err := f.client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Annotations = map[string]string{"mantlet.io/mesh": "disabled"}
	n.ResourceVersion = "2"
	if _, err := f.client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	st := f.next(t)
	if st.Generation <= first.Generation || st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.10")).Enrolled {
		t.Fatalf("after opting the namespace out: generation %d (first %d), pod a still enrolled", st.Generation, first.Generation)
	}

	// A pod's IP changes (a restart in place with a new sandbox).
	p, err = pods.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.ResourceVersion = "3"
	p.Status.PodIP, p.Status.PodIPs = "198.19.1.20", []corev1.PodIP{{IP: "198.19.1.20"}}
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	st = f.next(t)
	if st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.10")) != nil || st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.20")) == nil {
		t.Fatal("after pod a's IP changed, the state still has the old address or lacks the new one")
	}

	if err := pods.Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	st = f.next(t)
	if st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.11")) != nil {
		t.Fatal("a deleted pod is still in the state")
	}
}

// TestAnInvalidEditKeepsTheLastGoodVersion: an edit of a MeshPolicy that
// the API server's schema accepts but mantlet's validation refuses never
// takes the policy out of force (a DENY would silently vanish); the last
// valid version stays, and the status, InvalidPolicies (the condition)
// and the rejected count say so until a valid edit replaces it.
func TestAnInvalidEditKeepsTheLastGoodVersion(t *testing.T) {
	deny := func(gen int64, spec map[string]any) *unstructured.Unstructured {
		u := meshPolicy("shop", "deny-22", spec)
		u.SetGeneration(gen)
		u.SetResourceVersion(fmt.Sprint(gen))
		return u
	}
	denyPort := func(port string) map[string]any {
		return map[string]any{"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{port}}}}}
	}
	f, first := newFixture(t, []runtime.Object{
		ns("shop", map[string]string{"mantlet.io/mesh": "enabled"}),
		node("node1", "198.18.0.1"),
		pod("shop", "a", "a", "node1", "198.19.1.10", nil),
	}, deny(1, denyPort("22")))
	ports := func(st *source.State) string {
		for _, p := range st.Policies {
			if p.Name == "deny-22" {
				return fmt.Sprintf("%s [%s]", p.Spec.Action, p.Spec.Rules[0].To.Ports[0].String())
			}
		}
		return "not in force"
	}
	if got := ports(first); got != "DENY [22]" {
		t.Fatalf("first state: deny-22 is %s", got)
	}
	ctx := context.Background()
	policies := f.dyn.Resource(MeshPolicies).Namespace("shop")
	if _, err := policies.Update(ctx, deny(2, map[string]any{"action": "MAYBE"}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The source may emit a state for the rejected edit (it does not
	// compare whole states); every state it emits keeps generation 1 in
	// force, up to the one with a pod added afterwards.
	if _, err := f.client.CoreV1().Pods("shop").Create(ctx, pod("shop", "b", "b", "node1", "198.19.1.11", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var st *source.State
	for st = f.next(t); ; st = f.next(t) {
		if got := ports(st); got != "DENY [22]" {
			t.Fatalf("after an invalid edit deny-22 is %s (generation %d), want generation 1 (DENY [22]) still in force", got, st.Generation)
		}
		if st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.11")) != nil {
			break
		}
	}
	why := f.src.InvalidPolicies()["shop/deny-22"]
	if !strings.Contains(why, "spec.action") || !strings.Contains(why, "generation 1 stays in force") {
		t.Errorf("the rejected edit is reported as %q, want the field and the generation in force", why)
	}
	status := f.src.Status()
	if !status.LastEditRejected || status.Rejected != 1 || len(status.Problems) != 1 || !strings.Contains(status.Problems[0], "MeshPolicy shop/deny-22 rejected") {
		t.Errorf("Status() = %+v, want the rejected edit counted and named", status)
	}

	if _, err := policies.Update(ctx, deny(3, denyPort("23")), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	st = f.next(t)
	if got := ports(st); got != "DENY [23]" {
		t.Errorf("after a valid edit deny-22 is %s, want DENY [23]", got)
	}
	if status := f.src.Status(); status.LastEditRejected || len(status.Problems) != 0 || len(f.src.InvalidPolicies()) != 0 {
		t.Errorf("after a valid edit Status() = %+v, invalid %v; want nothing rejected", status, f.src.InvalidPolicies())
	}
}

// TestStripPodKeepsWhatMantletReads: the informer holds pods small.
func TestStripPodKeepsWhatMantletReads(t *testing.T) {
	in := pod("shop", "a", "a", "node1", "198.19.1.10", map[string]string{"app": "web"})
	in.Annotations["mantlet.io/mesh"] = "disabled"
	out, err := strip(in)
	if err != nil {
		t.Fatal(err)
	}
	p := out.(*cachedPod)
	if p.Annotations["unrelated.example/big"] != "" || p.Annotations["mantlet.io/mesh"] != "disabled" {
		t.Errorf("annotations kept: %v", p.Annotations)
	}
	if len(p.Ports) != 1 || p.Ports[0].Name != "http" || p.Labels["app"] != "web" || p.PodIP != "198.19.1.10" ||
		p.NodeName != "node1" || p.UID != "uid-a" || p.resourceVersion != in.ResourceVersion {
		t.Errorf("stripped pod %+v", p)
	}
	// The informer's cache keys it by namespace and name.
	if key, err := cache.MetaNamespaceKeyFunc(out); err != nil || key != "shop/a" {
		t.Errorf("key %q, %v; want shop/a", key, err)
	}
	if again, _ := strip(out); again != out {
		t.Errorf("strip of a stripped pod made %v, want it unchanged", again)
	}
}

// BenchmarkBuild measures one build of the state from the informers'
// caches with 10,000 pods in 100 namespaces, 1,000 services and 1,000
// MeshPolicies: what every change costs before the debounce lets it out.
// from_scratch makes every workload anew; one_pod_changed is a build
// after one pod's labels changed, which reuses the other pods' workloads.
func BenchmarkBuild(b *testing.B) {
	var core []runtime.Object
	var pols []runtime.Object
	core = append(core, node("node1", "198.18.0.1"))
	for i := range 100 {
		nsName := fmt.Sprintf("ns-%d", i)
		core = append(core, ns(nsName, map[string]string{"mantlet.io/mesh": "enabled"}))
		for j := range 100 {
			core = append(core, pod(nsName, fmt.Sprintf("pod-%d", j), fmt.Sprintf("%d-%d", i, j), "node1",
				fmt.Sprintf("10.%d.%d.%d", 1+i/200, i%200, 10+j), map[string]string{"app": fmt.Sprintf("svc-%d", j%10)}))
		}
		for k := range 10 {
			core = append(core, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: nsName, Name: fmt.Sprintf("svc-%d", k)},
				Spec: corev1.ServiceSpec{ClusterIP: fmt.Sprintf("10.96.%d.%d", i, k+1), Selector: map[string]string{"app": fmt.Sprintf("svc-%d", k)},
					Ports: []corev1.ServicePort{{Port: 80}}}})
			pols = append(pols, meshPolicy(nsName, fmt.Sprintf("pol-%d", k), map[string]any{"action": "ALLOW",
				"selector": map[string]any{"matchLabels": map[string]any{"app": fmt.Sprintf("svc-%d", k)}},
				"rules":    []any{map[string]any{"to": map[string]any{"ports": []any{"80"}}}}}))
		}
	}
	f, first := newFixture(b, core, pols...)
	if n := len(first.Snapshot.Workloads()); n != 10000 {
		b.Fatalf("%d workloads, want 10000", n)
	}
	b.Run("from_scratch", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			f.src.podCache = file.PodCache{}
			if _, err := f.src.build(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("one_pod_changed", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			p := stripPod(pod("ns-7", "pod-7", "7-7", "node1", "10.1.7.17", map[string]string{"app": "svc-7", "churn": strconv.Itoa(i)}))
			if err := f.src.pods.Update(p); err != nil {
				b.Fatal(err)
			}
			if _, err := f.src.build(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestConditionMessagesFitTheAPI: a long validation message is cut to
// what a condition holds, at a character boundary.
func TestConditionMessagesFitTheAPI(t *testing.T) {
	short := "spec.action: want ALLOW, DENY or AUDIT"
	if got := truncate(short); got != short {
		t.Errorf("truncate(%q) = %q", short, got)
	}
	long := strings.Repeat("é", maxMessage)
	got := truncate(long)
	if len(got) > maxMessage || !strings.HasSuffix(got, " (cut short)") || !utf8.ValidString(got) {
		t.Errorf("truncate of %d bytes gave %d bytes, valid UTF-8 %v", len(long), len(got), utf8.ValidString(got))
	}
}

// TestSortPodsSortsByNamespaceAndName: pods come from the cache in no
// order; every build gets them sorted, whether their order is made anew
// (pods came or went) or taken from the last build (pods only changed).
func TestSortPodsSortsByNamespaceAndName(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var pods []*file.Pod
	for i := range 50 {
		pods = append(pods, &file.Pod{Namespace: fmt.Sprint("ns-", i%3), Name: fmt.Sprint("pod-", i), UID: fmt.Sprint("uid-", i)})
	}
	s := &Source{}
	for step := range 100 {
		switch r.IntN(3) {
		case 0: // a pod changed: a new object, same UID
			i := r.IntN(len(pods))
			cp := *pods[i]
			cp.Labels = map[string]string{"step": fmt.Sprint(step)}
			pods[i] = &cp
		case 1: // one went, another came
			i := r.IntN(len(pods))
			pods[i] = &file.Pod{Namespace: fmt.Sprint("ns-", r.IntN(3)), Name: fmt.Sprint("new-", step), UID: fmt.Sprint("new-", step)}
		}
		r.Shuffle(len(pods), func(i, j int) { pods[i], pods[j] = pods[j], pods[i] })
		s.sortPods(pods)
		if !slices.IsSortedFunc(pods, func(a, b *file.Pod) int {
			return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
		}) {
			t.Fatalf("step %d: not sorted", step)
		}
	}
}
