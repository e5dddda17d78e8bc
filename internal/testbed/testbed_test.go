package testbed

import (
	"bytes"
	"net/netip"
	"os"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

func TestLayoutFollowsTheAddressPlan(t *testing.T) {
	spec := Spec{Nodes: []NodeSpec{
		{Name: "alpha", Pods: []PodSpec{{Name: "client", Namespace: "shop"}, {Name: "server", ServiceAccount: "api"}}},
		{Name: "beta", Pods: []PodSpec{{Name: "db"}}},
	}}
	tb, err := layout(spec, "tbx1")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		got, want string
	}{
		{tb.Underlay(), "/run/netns/tbx1-underlay"},
		{tb.Node("alpha").IP.String(), "198.18.0.1"},
		{tb.Node("beta").IP.String(), "198.18.0.2"},
		{tb.Node("beta").PodCIDR.String(), "198.19.2.0/24"},
		{tb.Node("alpha").NS, "/run/netns/tbx1-node-alpha"},
		{tb.Node("alpha").Uplink, "eth0"},
		{tb.Pod("client").IP.String(), "198.19.1.11"},
		{tb.Pod("server").IP.String(), "198.19.1.12"},
		{tb.Pod("db").IP.String(), "198.19.2.11"},
		{tb.Pod("server").HostVeth, "veth2"},
		{tb.Pod("db").NS, "/run/netns/tbx1-pod-db"},
		{tb.Pod("client").Namespace, "shop"},
		{tb.Pod("db").Namespace, "default"},
		{tb.Pod("server").ServiceAccount, "api"},
		{tb.Pod("db").ServiceAccount, "default"},
		{tb.Pod("db").Node, "beta"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if len(tb.Nodes()) != 2 || len(tb.Pods()) != 3 || len(tb.Node("alpha").Pods) != 2 {
		t.Errorf("nodes %d, pods %d, pods on alpha %d; want 2, 3, 2", len(tb.Nodes()), len(tb.Pods()), len(tb.Node("alpha").Pods))
	}
	if tb.Pod("nope") != nil || tb.Node("nope") != nil {
		t.Error("lookup of an unknown name returned something")
	}
	for _, p := range tb.Pods() {
		if n := tb.Node(p.Node); !n.PodCIDR.Contains(p.IP) {
			t.Errorf("pod %s IP %s outside its node's pod CIDR %s", p.Name, p.IP, n.PodCIDR)
		}
		if len(p.HostVeth) > 15 {
			t.Errorf("host veth name %q is longer than 15 characters", p.HostVeth)
		}
	}
	for i, n := range tb.Nodes() {
		if len(bridgePort(i)) > 15 || !NodeCIDR.Contains(n.IP) {
			t.Errorf("node %s: port %q, IP %s", n.Name, bridgePort(i), n.IP)
		}
	}
}

func TestLayoutRejectsBadSpecs(t *testing.T) {
	one := func(pods ...PodSpec) []NodeSpec { return []NodeSpec{{Name: "n1", Pods: pods}} }
	tests := []struct {
		name   string
		spec   Spec
		prefix string
		want   string
	}{
		{"no nodes", Spec{}, "tb1", "spec has no nodes"},
		{"prefix with a dash", Spec{Nodes: one()}, "tb-1", "want only lower-case letters and digits"},
		{"prefix too long", Spec{Nodes: one()}, "abcdefghijklm", "want 1 to 12 characters"},
		{"upper-case node", Spec{Nodes: []NodeSpec{{Name: "Node1"}}}, "tb1", `node name "Node1"`},
		{"same node twice", Spec{Nodes: []NodeSpec{{Name: "a"}, {Name: "a"}}}, "tb1", `node "a" appears twice`},
		{"same pod on two nodes", Spec{Nodes: []NodeSpec{{Name: "a", Pods: []PodSpec{{Name: "p"}}}, {Name: "b", Pods: []PodSpec{{Name: "p"}}}}}, "tb1", `pod "p" appears twice`},
		{"bad pod namespace", Spec{Nodes: one(PodSpec{Name: "p", Namespace: "a_b"})}, "tb1", `namespace of pod p name "a_b"`},
		{"service without ports", Spec{Nodes: one(), Services: []ServiceSpec{{Name: "s"}}}, "tb1", `service "s" has no ports`},
		{"too many pods", SimpleSpec(1, maxPodsPerNode+1, ""), "tb1", "the address plan allows 240"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := layout(tt.spec, tt.prefix)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("layout error = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestManifestDescribesTheCluster(t *testing.T) {
	spec := Spec{
		Nodes: []NodeSpec{
			{Name: "n1", Pods: []PodSpec{{Name: "client", Namespace: "mesh", ServiceAccount: "sleep", Labels: map[string]string{"app": "client"}}}},
			{Name: "n2", Pods: []PodSpec{{Name: "server", Namespace: "mesh", Labels: map[string]string{"app": "server"}}, {Name: "legacy", Namespace: "plain"}}},
		},
		Namespaces: map[string]map[string]string{"mesh": {"mantlet.io/mesh": "enabled"}},
		Services:   []ServiceSpec{{Name: "server", Namespace: "mesh", Selector: map[string]string{"app": "server"}, Ports: []ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}}},
	}
	tb, err := layout(spec, "tbm")
	if err != nil {
		t.Fatal(err)
	}
	tb.SetPodAnnotations("legacy", map[string]string{"mantlet.io/mesh": "disabled"})

	objs := map[string]map[string][]byte{}
	for _, doc := range bytes.Split(tb.Manifest(), []byte("\n---\n")) {
		var meta struct {
			Kind     string                `json:"kind"`
			Metadata struct{ Name string } `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil || meta.Kind == "" {
			continue
		}
		if objs[meta.Kind] == nil {
			objs[meta.Kind] = map[string][]byte{}
		}
		objs[meta.Kind][meta.Metadata.Name] = doc
	}
	decode := func(kind, name string, into any) {
		t.Helper()
		doc, ok := objs[kind][name]
		if !ok {
			t.Fatalf("manifest has no %s %q; has %v", kind, name, objs)
		}
		if err := yaml.UnmarshalStrict(doc, into); err != nil {
			t.Fatalf("%s %s: %v", kind, name, err)
		}
	}

	var mesh, plain corev1.Namespace
	decode("Namespace", "mesh", &mesh)
	decode("Namespace", "plain", &plain)
	if mesh.Annotations["mantlet.io/mesh"] != "enabled" || len(plain.Annotations) != 0 {
		t.Errorf("namespace annotations: mesh %v, plain %v", mesh.Annotations, plain.Annotations)
	}

	var n2 corev1.Node
	decode("Node", "n2", &n2)
	if len(n2.Status.Addresses) == 0 || n2.Status.Addresses[0] != (corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "198.18.0.2"}) || n2.Spec.PodCIDR != "198.19.2.0/24" {
		t.Errorf("node n2: addresses %v, podCIDR %q", n2.Status.Addresses, n2.Spec.PodCIDR)
	}

	var client, legacy corev1.Pod
	decode("Pod", "client", &client)
	decode("Pod", "legacy", &legacy)
	got := []string{client.Namespace, client.Spec.NodeName, client.Spec.ServiceAccountName, client.Status.PodIP, client.Status.PodIPs[0].IP, client.Status.HostIP, client.Labels["app"], string(client.Status.Phase)}
	want := []string{"mesh", "n1", "sleep", "198.19.1.11", "198.19.1.11", "198.18.0.1", "client", "Running"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("pod client:\n got %v\nwant %v", got, want)
	}
	if legacy.Spec.ServiceAccountName != "default" || legacy.Annotations["mantlet.io/mesh"] != "disabled" {
		t.Errorf("pod legacy: service account %q, annotations %v", legacy.Spec.ServiceAccountName, legacy.Annotations)
	}

	var svc corev1.Service
	decode("Service", "server", &svc)
	if svc.Spec.ClusterIP != "198.18.128.1" || svc.Spec.Ports[0].Port != 80 || svc.Spec.Ports[0].TargetPort.IntValue() != 8080 || svc.Spec.Selector["app"] != "server" {
		t.Errorf("service: clusterIP %s, ports %v, selector %v", svc.Spec.ClusterIP, svc.Spec.Ports, svc.Spec.Selector)
	}
	if !ServiceCIDR.Contains(netip.MustParseAddr(svc.Spec.ClusterIP)) {
		t.Errorf("service IP %s outside %s", svc.Spec.ClusterIP, ServiceCIDR)
	}

	// Changing an annotation changes the next manifest, not the spec given.
	tb.SetNamespaceAnnotations("mesh", nil)
	if bytes.Contains(tb.Manifest(), []byte("mantlet.io/mesh: enabled")) {
		t.Error("manifest still opts namespace mesh in after its annotations were removed")
	}
	if spec.Namespaces["mesh"]["mantlet.io/mesh"] != "enabled" {
		t.Error("SetNamespaceAnnotations changed the caller's spec")
	}
}

func TestWriteManifestReplacesTheFileWhole(t *testing.T) {
	tb, err := layout(SimpleSpec(1, 1, "apps"), "tbw")
	if err != nil {
		t.Fatal(err)
	}
	tb.stateDir = t.TempDir()
	for _, ann := range []map[string]string{nil, {"mantlet.io/mesh": "enabled"}} {
		tb.SetNamespaceAnnotations("apps", ann)
		path, err := tb.WriteManifest()
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, tb.Manifest()) {
			t.Fatalf("%s holds %q (err %v), want the current manifest", path, got, err)
		}
	}
	entries, _ := os.ReadDir(tb.stateDir)
	if len(entries) != 1 || entries[0].Name() != "tbw.yaml" {
		t.Errorf("state directory holds %v, want only tbw.yaml", entries)
	}
}
