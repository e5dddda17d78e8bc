package file

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/workload"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// randomCluster is a cluster that TestPodCacheBuildsWhatAFullBuildBuilds
// changes at random, as a Kubernetes source's informers would: every
// change replaces an object, never edits one in place.
type randomCluster struct {
	r          *rand.Rand
	namespaces map[string]*corev1.Namespace
	nodes      map[string]*corev1.Node
	pods       map[string]*Pod
	services   map[string]*corev1.Service
	endpoints  map[string][]string
	uid        int
}

func (c *randomCluster) namespace(name string) *corev1.Namespace {
	ann := map[string]string{}
	switch c.r.IntN(4) {
	case 0:
	case 1:
		ann[AnnotationMesh] = meshDisabled
	default:
		ann[AnnotationMesh] = meshEnabled
	}
	if c.r.IntN(5) == 0 {
		ann[AnnotationMesh] = "sometimes" // invalid: a warning, the namespace stays unmeshed
	}
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
}

func (c *randomCluster) node(name string, n int) *corev1.Node {
	o := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("198.18.0.%d", n+c.r.IntN(2)*100)}}}}
	if c.r.IntN(4) == 0 {
		o.Annotations = map[string]string{AnnotationTrustDomain: "other.example"}
	}
	return o
}

func (c *randomCluster) pod(ns, name string) *Pod {
	c.uid++
	p := &Pod{Name: name, Namespace: ns, UID: fmt.Sprint("uid-", c.uid),
		Labels:   map[string]string{"app": fmt.Sprint("app-", c.r.IntN(3))},
		NodeName: fmt.Sprint("node-", c.r.IntN(4)), ServiceAccountName: fmt.Sprint("sa-", c.r.IntN(2)),
		Phase: corev1.PodRunning, PodIP: fmt.Sprintf("198.19.%d.%d", c.r.IntN(2), c.r.IntN(40)),
		Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: int32(8080 + c.r.IntN(2))}}}
	switch c.r.IntN(10) {
	case 0:
		p.Annotations = map[string]string{AnnotationMesh: meshDisabled}
	case 1:
		p.Annotations = map[string]string{AnnotationMesh: meshEnabled} // a warning where the namespace is not meshed
	case 2:
		p.Phase, p.PodIP = corev1.PodPending, ""
	case 3:
		p.PodIPs = []string{p.PodIP}
	case 4:
		p.HostIP = "198.18.0.99" // no node's address: dropped when the node is known
	}
	return p
}

func (c *randomCluster) service(ns, name string) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{ClusterIP: fmt.Sprintf("198.18.128.%d", c.r.IntN(30)), Selector: map[string]string{"app": "x"},
			Ports: []corev1.ServicePort{{Port: 80}}}}
}

// change makes one random change.
func (c *randomCluster) change() {
	nsName := fmt.Sprint("ns-", c.r.IntN(4))
	key := nsName + "/" + fmt.Sprint("pod-", c.r.IntN(12))
	switch c.r.IntN(10) {
	case 0:
		c.namespaces[nsName] = c.namespace(nsName)
	case 1:
		n := c.r.IntN(4)
		name := fmt.Sprint("node-", n)
		if c.r.IntN(3) == 0 {
			delete(c.nodes, name)
		} else {
			c.nodes[name] = c.node(name, n)
		}
	case 2:
		delete(c.pods, key)
	case 3:
		name := fmt.Sprint("svc-", c.r.IntN(3))
		c.services[nsName+"/"+name] = c.service(nsName, name)
		var eps []string
		for _, p := range c.pods {
			if p.Namespace == nsName && c.r.IntN(2) == 0 {
				eps = append(eps, p.UID)
			}
		}
		c.endpoints[nsName+"/"+name] = eps
	case 4, 5:
		// A label change: a copy with one field changed, as an update.
		if p, ok := c.pods[key]; ok {
			cp := *p
			cp.Labels = map[string]string{"app": fmt.Sprint("app-", c.r.IntN(3))}
			c.pods[key] = &cp
		}
	default:
		ns, name, _ := strings.Cut(key, "/")
		c.pods[key] = c.pod(ns, name)
	}
}

func (c *randomCluster) objects(cache *PodCache) Objects {
	o := Objects{Endpoints: c.endpoints, Cache: cache}
	for _, k := range slices.Sorted(mapsKeys(c.namespaces)) {
		o.Namespaces = append(o.Namespaces, c.namespaces[k])
	}
	for _, k := range slices.Sorted(mapsKeys(c.nodes)) {
		o.Nodes = append(o.Nodes, c.nodes[k])
	}
	for _, k := range slices.Sorted(mapsKeys(c.pods)) {
		o.Pods = append(o.Pods, c.pods[k])
	}
	for _, k := range slices.Sorted(mapsKeys(c.services)) {
		o.Services = append(o.Services, c.services[k])
	}
	return o
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// TestPodCacheBuildsWhatAFullBuildBuilds: over random sequences of
// changes (pods created, deleted, relabelled, moved; namespaces meshed
// and not; nodes readdressed, moved to another trust domain, removed;
// services and their endpoints), a build that reuses the last builds'
// workloads gives the same state, warnings included, as a build from
// scratch, and shares the workloads of the pods that did not change.
func TestPodCacheBuildsWhatAFullBuildBuilds(t *testing.T) {
	for seed := range uint64(20) {
		c := &randomCluster{r: rand.New(rand.NewPCG(seed, 1)), namespaces: map[string]*corev1.Namespace{}, nodes: map[string]*corev1.Node{},
			pods: map[string]*Pod{}, services: map[string]*corev1.Service{}, endpoints: map[string][]string{}}
		for i := range 4 {
			name := fmt.Sprint("ns-", i)
			c.namespaces[name] = c.namespace(name)
			c.nodes[fmt.Sprint("node-", i)] = c.node(fmt.Sprint("node-", i), i)
		}
		for range 40 {
			c.change()
		}
		var cache PodCache
		var prev *Manifest
		var before map[string]inputs
		for step := range 200 {
			inc := BuildObjects("kubernetes", c.objects(&cache))
			full := BuildObjects("kubernetes", c.objects(nil))
			if inc == nil || full == nil {
				t.Fatalf("seed %d step %d: a build failed: %v, %v", seed, step, inc, full)
			}
			want, got := full.Snapshot, inc.Snapshot
			if !reflect.DeepEqual(got.Workloads(), want.Workloads()) || !reflect.DeepEqual(got.Services(), want.Services()) ||
				!reflect.DeepEqual(got.Nodes(), want.Nodes()) {
				t.Fatalf("seed %d step %d: the build with the cache differs:\n got %v\nwant %v", seed, step, dump(got.Workloads()), dump(want.Workloads()))
			}
			if g, w := warnings(inc), warnings(full); !slices.Equal(g, w) {
				t.Fatalf("seed %d step %d: warnings differ:\n got %q\nwant %q", seed, step, g, w)
			}
			// A pod that is the same object as before, in the same
			// namespace and node objects, and that had nothing to warn
			// about, keeps its workload.
			now := c.inputs()
			for _, w := range got.Workloads() {
				old := prev.snapshotWorkload(w.UID)
				if old != nil && old != w && before[w.UID] == now[w.UID] && !warned(prev, w) {
					t.Fatalf("seed %d step %d: workload %s made again though nothing it is made of changed", seed, step, w)
				}
			}
			prev, before = inc, now
			c.change()
		}
		if len(cache.m) > len(c.pods) {
			t.Errorf("seed %d: the cache holds %d pods, the cluster %d", seed, len(cache.m), len(c.pods))
		}
	}
}

// inputs are the objects a pod's workload is made of.
type inputs struct {
	pod  *Pod
	ns   *corev1.Namespace
	node *corev1.Node
}

// inputs returns each pod's, by UID.
func (c *randomCluster) inputs() map[string]inputs {
	out := map[string]inputs{}
	for _, p := range c.pods {
		out[p.UID] = inputs{p, c.namespaces[p.Namespace], c.nodes[p.NodeName]}
	}
	return out
}

func (m *Manifest) snapshotWorkload(uid string) *workload.Workload {
	if m == nil {
		return nil
	}
	return m.Snapshot.WorkloadByUID(uid)
}

// warned reports whether m warned about w's pod.
func warned(m *Manifest, w *workload.Workload) bool {
	for _, e := range m.Warnings {
		if e.Loc.Kind == "Pod" && e.Loc.Namespace == w.Namespace && e.Loc.Name == w.Name {
			return true
		}
	}
	return false
}

func warnings(m *Manifest) []string {
	var out []string
	for _, w := range m.Warnings {
		out = append(out, w.Error())
	}
	return out
}

func dump(ws []*workload.Workload) string {
	var b strings.Builder
	for _, w := range ws {
		fmt.Fprintf(&b, "%+v\n", *w)
	}
	return b.String()
}
