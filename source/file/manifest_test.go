package file

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/policy/v1alpha1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func TestReadFileBuildsTheSnapshot(t *testing.T) {
	m, err := ReadFile("testdata/cluster.yaml", Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := m.Snapshot
	type row struct {
		ns, name, sa, node, nodeIP, ip string
		enrolled                       bool
	}
	var got []row
	for _, w := range s.Workloads() {
		got = append(got, row{w.Namespace, w.Name, w.ServiceAccount, w.Node, w.NodeIP.String(), w.IPs[0].String(), w.Enrolled})
	}
	want := []row{
		{"legacy", "legacy-0", "default", "node-2", "198.18.0.2", "198.19.2.20", false},
		{"shop", "checkout-0", "checkout", "node-2", "198.18.0.2", "198.19.2.10", true},
		{"shop", "debug-0", "default", "node-1", "198.18.0.1", "198.19.1.99", false},
		{"shop", "frontend-0", "frontend", "node-1", "198.18.0.1", "198.19.1.10", true},
	}
	if !slices.Equal(got, want) {
		t.Errorf("workloads:\n got %v\nwant %v", got, want)
	}
	if w := s.WorkloadByIP(netip.MustParseAddr("198.19.2.10")); w == nil || w.UID != "0b0e6a4c-5d0e-4b8e-9b5f-3f3c8d9a1e01" || w.Labels["app"] != "checkout" {
		t.Errorf("checkout-0 = %+v, want its uid and labels from the file", w)
	}
	if w := s.WorkloadByIP(netip.MustParseAddr("198.19.1.10")); w == nil || w.UID != "shop/frontend-0" {
		t.Errorf("frontend-0 = %+v, want uid shop/frontend-0 when metadata.uid is absent", w)
	}
	if n, ok := s.NodeByIP(netip.MustParseAddr("198.18.0.2")); !ok || n != "node-2" {
		t.Errorf("NodeByIP(198.18.0.2) = %q, %v", n, ok)
	}
	svc, ep, w, ok := s.ResolveService(netip.MustParseAddrPort("198.18.128.10:80"), 0)
	if !ok || svc.Name != "checkout" || w.Name != "checkout-0" || ep.String() != "198.19.2.10:8080" {
		t.Errorf("ResolveService(checkout:80) = %v %v %v %v; want checkout-0 at 198.19.2.10:8080 (named targetPort resolved)", svc, ep, w, ok)
	}
	if _, _, _, ok := s.ResolveService(netip.MustParseAddrPort("198.18.128.10:53"), 0); ok {
		t.Error("the UDP port of the service resolved; the mesh carries TCP only")
	}
	if m.MTLS["shop"] != v1alpha1.MTLSStrict || len(m.MTLS) != 1 {
		t.Errorf("MTLS = %v, want shop: STRICT only", m.MTLS)
	}
	var warnings []string
	for _, w := range m.Warnings {
		warnings = append(warnings, w.Error())
	}
	wantWarn := []string{"cluster.yaml: document 10 (Deployment shop/frontend): skipped: mantlet does not read apps/v1 Deployment (it reads v1 Namespace, Pod, Node, Service and List)"}
	if !slices.Equal(warnings, wantWarn) {
		t.Errorf("warnings:\n got %q\nwant %q", warnings, wantWarn)
	}
}

// base is prepended to every row of the error table: documents 1 and 2.
const base = `{apiVersion: v1, kind: Node, metadata: {name: node-1}, status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: shop, annotations: {mantlet.io/mesh: enabled}}}
---
`

// policyKinds registers a stand-in for MeshPolicy: spec.action must be
// ALLOW or DENY.
var policyKinds = Options{Kinds: map[schema.GroupKind]KindDecoder{{Group: "mantlet.io", Kind: "MeshPolicy"}: func(o *Object) (any, error) {
	var v struct{ Spec struct{ Action string } }
	if err := json.Unmarshal(o.JSON, &v); err != nil {
		return nil, err
	}
	if v.Spec.Action != "ALLOW" && v.Spec.Action != "DENY" {
		return nil, errors.New("spec.action: want ALLOW or DENY")
	}
	return v.Spec.Action, nil
}}}

func TestParseRejectsBadInput(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"a pod IP that is not an address",
			`{apiVersion: v1, kind: Pod, metadata: {name: frontend-0, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 10.0.0.300}}`,
			`f.yaml: document 3 (Pod shop/frontend-0): status.podIP "10.0.0.300": not an IP address`},
		{"a pod without an IP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIP: missing (want the pod's address, e.g. "198.19.1.10"; pods without one must have status.phase Pending)`},
		{"a loopback pod IP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 127.0.0.1}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIP "127.0.0.1": not a unicast address a pod or node can have`},
		{"podIPs disagreeing with podIP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1, podIPs: [{ip: 198.19.1.2}]}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIPs[0].ip "198.19.1.2": must equal status.podIP "198.19.1.1"`},
		{"a bad podIP next to podIPs",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.311, podIPs: [{ip: 198.19.1.11}]}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIP "198.19.1.311": not an IP address`},
		{"a pod without a node",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): spec.nodeName: missing (want the name of the node the pod runs on)`},
		{"a pod on an unknown node without hostIP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-9}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): spec.nodeName "node-9": no Node object of that name and no status.hostIP (add a Node with an InternalIP, or set status.hostIP)`},
		{"a hostIP that is not its node's",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1, hostIP: 198.18.0.7}}`,
			`f.yaml: document 3 (Pod shop/a): status.hostIP "198.18.0.7": is not an InternalIP of Node node-1 (198.18.0.1)`},
		{"a pod in a namespace the file lacks",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shpo}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shpo/a): metadata.namespace "shpo": no Namespace object of that name in the file (add one; annotate it mantlet.io/mesh: enabled to mesh its pods)`},
		{"a misspelt opt-out",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, annotations: {mantlet.io/mesh: "off"}}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): metadata.annotations["mantlet.io/mesh"] "off": want "disabled" (opt this pod out) or "enabled"`},
		{"a pod name that is not a DNS name",
			`{apiVersion: v1, kind: Pod, metadata: {name: Front_End, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/Front_End): metadata.name "Front_End": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')`},
		{"two pods with one IP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 4 (Pod shop/b): status.podIP "198.19.1.1": address already used by document 3 (Pod shop/a)`},
		{"a pod with its node's IP",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.18.0.1}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIP "198.18.0.1": address already used by document 1 (Node node-1)`},
		{"the same pod twice",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.2}}`,
			`f.yaml: document 4 (Pod shop/a): metadata.name "a": duplicate: document 3 (Pod shop/a) has the same kind, namespace and name`},
		{"two pods with one uid",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, uid: u1}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: shop, uid: u1}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.2}}`,
			`f.yaml: document 4 (Pod shop/b): metadata.uid "u1": already used by document 3 (Pod shop/a)`},
		{"a node without InternalIP",
			`{apiVersion: v1, kind: Node, metadata: {name: node-2}, status: {addresses: [{type: Hostname, address: node-2}]}}`,
			`f.yaml: document 3 (Node node-2): status.addresses: no InternalIP (want an entry with type: InternalIP and the node's underlay address)`},
		{"a namespace with a misspelt mesh value",
			`{apiVersion: v1, kind: Namespace, metadata: {name: web, annotations: {mantlet.io/mesh: "true"}}}`,
			`f.yaml: document 3 (Namespace web): metadata.annotations["mantlet.io/mesh"] "true": want "enabled" or "disabled"`},
		{"a namespace with an unknown mTLS mode",
			`{apiVersion: v1, kind: Namespace, metadata: {name: web, annotations: {mantlet.io/mtls: strictest}}}`,
			`f.yaml: document 3 (Namespace web): metadata.annotations["mantlet.io/mtls"] "strictest": want STRICT or PERMISSIVE`},
		{"a service without a cluster IP",
			`{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {ports: [{port: 80}]}}`,
			`f.yaml: document 3 (Service shop/web): spec.clusterIP: missing (want the service's virtual IP, e.g. "198.18.128.10", or "None" for a headless service)`},
		{"a service port out of range",
			`{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 198.18.128.1, ports: [{port: 70000}]}}`,
			`f.yaml: document 3 (Service shop/web): spec.ports[0].port "70000": want a port number from 1 to 65535`},
		{"a named target port no pod declares",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, labels: {app: web}}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 198.18.128.1, selector: {app: web}, ports: [{port: 80, targetPort: http}]}}`,
			`f.yaml: document 4 (Service shop/web): spec.ports[0].targetPort "http": no selected pod has a TCP container port of that name (name one in spec.containers[].ports, or use a number)`},
		{"a named target port meaning two numbers",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, labels: {app: web}}, spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}, status: {podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: shop, labels: {app: web}}, spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}, status: {podIP: 198.19.1.2}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 198.18.128.1, selector: {app: web}, ports: [{port: 80, targetPort: http}]}}`,
			`f.yaml: document 5 (Service shop/web): spec.ports[0].targetPort "http": means port 8080 on pod a but 9090 on pod b; mantlet needs one number per service port (use a number)`},
		{"two services on one VIP and port",
			`{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 198.18.128.1, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: api, namespace: shop}, spec: {clusterIP: 198.18.128.1, ports: [{port: 80}]}}`,
			`f.yaml: document 4 (Service shop/api): spec.clusterIP "198.18.128.1": address already used by document 3 (Service shop/web)`},
		{"a document without a kind",
			`{apiVersion: v1, metadata: {name: a}}`,
			`f.yaml: document 3: kind: missing (mantlet reads v1 Namespace, Pod, Node, Service and List; objects of other kinds are skipped)`},
		{"a core kind of another version",
			`{apiVersion: v2, kind: Pod, metadata: {name: a, namespace: shop}}`,
			`f.yaml: document 3 (Pod shop/a): apiVersion "v2": want "v1" for Pod`},
		{"a document that is not a mapping",
			`- just a list`,
			`f.yaml: document 3: not a Kubernetes object: want a mapping with apiVersion, kind and metadata`},
		{"a field of the wrong type",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: [node-1]}}`,
			`f.yaml: document 3 (Pod shop/a): cannot decode: cannot unmarshal array into Go struct field PodSpec.spec.nodeName of type string`},
		{"a name that YAML reads as a boolean",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: no}}`,
			`f.yaml: document 3 (Pod shop/a): cannot decode: cannot unmarshal bool into Go struct field PodSpec.spec.nodeName of type string (YAML reads y, n, yes, no, on, off, true and false as booleans: quote the value, e.g. "no")`},
		{"broken YAML, reported at its line in the file",
			"kind: Pod\n  name: [a",
			`f.yaml: document 3: not valid YAML: line 6: mapping values are not allowed in this context`},
		{"broken YAML after comments and an empty document",
			"# the pods\n---\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a\n",
			`f.yaml: document 3: not valid YAML: line 10: did not find expected ',' or '}'`},
		{"a field missing because it is misspelt",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIp: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): status.podIP: missing (want the pod's address, e.g. "198.19.1.10"; pods without one must have status.phase Pending); note: unknown field "status.podIp" was ignored`},
		{"a pod under apps/v1",
			`{apiVersion: apps/v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): apiVersion "apps/v1": want "v1" for Pod`},
		{"a service under networking.k8s.io",
			`{apiVersion: networking.k8s.io/v1, kind: Service, metadata: {name: web, namespace: shop}}`,
			`f.yaml: document 3 (Service shop/web): apiVersion "networking.k8s.io/v1": want "v1" for Service`},
		{"a plural kind",
			`{apiVersion: v1, kind: Pods, metadata: {name: a, namespace: shop}}`,
			`f.yaml: document 3 (Pods shop/a): kind "Pods": core v1 has no such kind; did you mean Pod?`},
		{"a kind in lower case",
			`{apiVersion: v1, kind: namespace, metadata: {name: web}}`,
			`f.yaml: document 3 (namespace web): kind "namespace": core v1 has no such kind; did you mean Namespace?`},
		{"a misspelt kind mantlet does not read",
			`{apiVersion: v1, kind: Configmap, metadata: {name: c, namespace: shop}}`,
			`f.yaml: document 3 (Configmap shop/c): kind "Configmap": core v1 has no such kind; did you mean ConfigMap?`},
		{"a kind core v1 does not have",
			`{apiVersion: v1, kind: Deployment, metadata: {name: d, namespace: shop}}`,
			`f.yaml: document 3 (Deployment shop/d): kind "Deployment": core v1 has no such kind (mantlet reads v1 Namespace, Pod, Node, Service and List)`},
		{"a misspelt kind inside a List",
			`{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: Nodes, metadata: {name: node-2}}]}`,
			`f.yaml: document 3 item 1 (Nodes node-2): kind "Nodes": core v1 has no such kind; did you mean Node?`},
		{"a bad item of a List",
			`{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: nope}}]}`,
			`f.yaml: document 3 item 1 (Pod shop/a): status.podIP "nope": not an IP address`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Parse("f.yaml", []byte(base+tc.yaml), Options{})
			if err == nil {
				t.Fatalf("parsed into %d workloads; want error %s", len(m.Snapshot.Workloads()), tc.want)
			}
			if err.Error() != tc.want {
				t.Fatalf("error:\n got %s\nwant %s", err, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("errors.As(*Error) failed on %T", err)
			}
		})
	}
}

func TestParseReportsEveryProblemInFileOrder(t *testing.T) {
	_, err := Parse("f.yaml", []byte(base+`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: x}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: shop}, status: {podIP: 198.19.1.2}}`), Options{})
	want := `f.yaml: document 3 (Pod shop/a): status.podIP "x": not an IP address
f.yaml: document 4 (Pod shop/b): spec.nodeName: missing (want the name of the node the pod runs on)`
	if err == nil || err.Error() != want {
		t.Fatalf("error:\n got %v\nwant %s", err, want)
	}
}

func TestParseWarnsWithoutFailing(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"a misspelt field",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1, podIp: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod shop/a): unknown field "status.podIp" (ignored)`},
		{"a core kind mantlet does not read",
			`{apiVersion: v1, kind: ConfigMap, metadata: {name: c, namespace: shop}}`,
			`f.yaml: document 3 (ConfigMap shop/c): skipped: mantlet does not read v1 ConfigMap (it reads v1 Namespace, Pod, Node, Service and List)`},
		{"a kind of a group no decoder is registered for",
			`{apiVersion: mantlet.io/v1alpha1, kind: MeshPolicy, metadata: {name: p, namespace: shop}}`,
			`f.yaml: document 3 (MeshPolicy shop/p): skipped: mantlet does not read mantlet.io/v1alpha1 MeshPolicy (it reads v1 Namespace, Pod, Node, Service and List)`},
		{"a Service of another project's API group",
			`{apiVersion: serving.knative.dev/v1, kind: Service, metadata: {name: web, namespace: shop}}`,
			`f.yaml: document 3 (Service shop/web): skipped: mantlet does not read serving.knative.dev/v1 Service (it reads v1 Namespace, Pod, Node, Service and List)`},
		{"a pod annotated enabled in an unmeshed namespace",
			`{apiVersion: v1, kind: Pod, metadata: {name: a, annotations: {mantlet.io/mesh: enabled}}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}`,
			`f.yaml: document 3 (Pod default/a): metadata.annotations["mantlet.io/mesh"] "enabled": has no effect on a pod; annotate Namespace default to mesh its pods`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Parse("f.yaml", []byte(base+tc.yaml), Options{})
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Warnings) != 1 || m.Warnings[0].Error() != tc.want {
				t.Fatalf("warnings = %v\nwant [%s]", m.Warnings, tc.want)
			}
		})
	}
}

func TestParseSkipsPodsWithoutAnAddressOfTheirOwn(t *testing.T) {
	m, err := Parse("f.yaml", []byte(base+`{apiVersion: v1, kind: Pod, metadata: {name: done, namespace: shop}, spec: {nodeName: node-1}, status: {phase: Succeeded, podIP: 198.19.1.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: new, namespace: shop}, spec: {nodeName: node-1}, status: {phase: Pending}}
---
{apiVersion: v1, kind: Pod, metadata: {name: host, namespace: shop}, spec: {nodeName: node-1, hostNetwork: true}, status: {podIP: 198.18.0.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: reuse, namespace: shop}, spec: {nodeName: node-1}, status: {phase: Running, podIP: 198.19.1.1}}`), Options{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, w := range m.Snapshot.Workloads() {
		names = append(names, w.Name)
	}
	if !slices.Equal(names, []string{"reuse"}) {
		t.Fatalf("workloads = %v, want only the running pod (finished, pending and host-network pods hold no address)", names)
	}
}

func TestParseReadsKubectlListsAndSeparators(t *testing.T) {
	in := `--- # leading separator and comments are fine
# only a comment
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: node-1}, status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.1}}
---
apiVersion: v1
kind: PodList
items:
- {metadata: {name: b}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.2}}
...
`
	m, err := Parse("f.yaml", []byte(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(m.Snapshot.Workloads()); got != 2 {
		t.Fatalf("%d workloads, want 2", got)
	}
}

func TestParseHandsRegisteredKindsToTheirDecoder(t *testing.T) {
	type policy struct{ Action string }
	gk := schema.GroupKind{Group: "mantlet.io", Kind: "MeshPolicy"}
	opts := Options{Kinds: map[schema.GroupKind]KindDecoder{gk: func(o *Object) (any, error) {
		var v struct{ Spec policy }
		if err := json.Unmarshal(o.JSON, &v); err != nil {
			return nil, err
		}
		if v.Spec.Action != "ALLOW" && v.Spec.Action != "DENY" {
			return nil, errors.New(`spec.action: want ALLOW or DENY`)
		}
		return v.Spec, nil
	}}}
	m, err := Parse("f.yaml", []byte(base+`{apiVersion: mantlet.io/v1alpha1, kind: MeshPolicy, metadata: {name: p, namespace: shop}, spec: {action: DENY}}`), opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Extra) != 1 || m.Extra[0].Kind != gk || m.Extra[0].Value.(policy).Action != "DENY" || m.Extra[0].Loc.Doc != 3 || len(m.Warnings) != 0 {
		t.Fatalf("Extra = %+v, warnings %v", m.Extra, m.Warnings)
	}
	_, err = Parse("f.yaml", []byte(base+`{apiVersion: mantlet.io/v1alpha1, kind: MeshPolicy, metadata: {name: p, namespace: shop}, spec: {action: MAYBE}}`), opts)
	if want := `f.yaml: document 3 (MeshPolicy shop/p): spec.action: want ALLOW or DENY`; err == nil || err.Error() != want {
		t.Fatalf("error = %v, want %s", err, want)
	}
}

// TestParseNeverSkipsAMisspeltObject: an object that is probably one
// mantlet reads, misspelt, rejects the file (skipping it would drop a
// policy or leave a pod unmeshed); objects of kinds nobody here reads are
// skipped with a warning that says what mantlet reads.
func TestParseNeverSkipsAMisspeltObject(t *testing.T) {
	const reads = "v1 Namespace, Pod, Node, Service and List, and mantlet.io MeshPolicy"
	for _, tc := range []struct {
		name, yaml, wantErr, wantWarn string
	}{
		{"a plural of a registered kind",
			`{apiVersion: mantlet.io/v1alpha1, kind: MeshPolicies, metadata: {name: p, namespace: shop}, spec: {action: DENY}}`,
			`f.yaml: document 3 (MeshPolicies shop/p): kind "MeshPolicies": group mantlet.io has no such kind; did you mean MeshPolicy?`, ""},
		{"a registered kind in lower case",
			`{apiVersion: mantlet.io/v1alpha1, kind: meshpolicy, metadata: {name: p, namespace: shop}}`,
			`f.yaml: document 3 (meshpolicy shop/p): kind "meshpolicy": group mantlet.io has no such kind; did you mean MeshPolicy?`, ""},
		{"an unknown kind of a registered group",
			`{apiVersion: mantlet.io/v1alpha1, kind: Frobnicator, metadata: {name: p, namespace: shop}}`,
			`f.yaml: document 3 (Frobnicator shop/p): kind "Frobnicator": group mantlet.io has no such kind (mantlet reads ` + reads + `)`, ""},
		{"a registered kind under core v1",
			`{apiVersion: v1, kind: MeshPolicy, metadata: {name: p, namespace: shop}}`,
			`f.yaml: document 3 (MeshPolicy shop/p): kind "MeshPolicy": core v1 has no such kind; MeshPolicy is a kind of group mantlet.io (apiVersion mantlet.io/<version>)`, ""},
		{"a core kind under a registered group",
			`{apiVersion: mantlet.io/v1alpha1, kind: Pod, metadata: {name: a, namespace: shop}}`,
			`f.yaml: document 3 (Pod shop/a): apiVersion "mantlet.io/v1alpha1": want "v1" for Pod`, ""},
		{"a Deployment",
			`{apiVersion: apps/v1, kind: Deployment, metadata: {name: d, namespace: shop}}`,
			"", `f.yaml: document 3 (Deployment shop/d): skipped: mantlet does not read apps/v1 Deployment (it reads ` + reads + `)`},
		{"a Secret",
			`{apiVersion: v1, kind: Secret, metadata: {name: s, namespace: shop}}`,
			"", `f.yaml: document 3 (Secret shop/s): skipped: mantlet does not read v1 Secret (it reads ` + reads + `)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Parse("f.yaml", []byte(base+tc.yaml), policyKinds)
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("error:\n got %v\nwant %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Warnings) != 1 || m.Warnings[0].Error() != tc.wantWarn {
				t.Fatalf("warnings = %v\nwant [%s]", m.Warnings, tc.wantWarn)
			}
		})
	}
}

func TestParseRefusesAFileWithoutObjects(t *testing.T) {
	for _, tc := range []struct{ name, yaml string }{
		{"an empty file", ""},
		{"blank lines", "\n  \n\n"},
		{"comments and separators", "# cluster\n---\n# nothing yet\n---\n"},
		{"a null document", "null\n---\n~\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Parse("f.yaml", []byte(tc.yaml), Options{})
			if want := "f.yaml: " + NoObjects; err == nil || err.Error() != want {
				t.Fatalf("Parse = %v, %v; want error %s", m, err, want)
			}
		})
	}
	m, err := Parse("f.yaml", []byte("# on purpose\n{apiVersion: v1, kind: List, items: []}\n"), Options{})
	if err != nil {
		t.Fatalf("an explicit empty List: %v", err)
	}
	if n := len(m.Snapshot.Workloads()); n != 0 {
		t.Fatalf("an explicit empty List made %d workloads", n)
	}
}

func TestReadFileNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(path, []byte("{apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {nodeName: node-1}, status: {podIP: nope, hostIP: 198.18.0.1}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := ReadFile(path, Options{})
	if want := `cluster.yaml: document 1 (Pod default/a): status.podIP "nope": not an IP address`; err == nil || err.Error() != want {
		t.Fatalf("error = %v, want %s", err, want)
	}
	if _, err := ReadFile(filepath.Join(dir, "missing.yaml"), Options{}); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Fatalf("missing file: error = %v, want one naming the file", err)
	}
}

func TestParseMTLSMode(t *testing.T) {
	for in, want := range map[string]v1alpha1.MTLSMode{"STRICT": v1alpha1.MTLSStrict, "permissive": v1alpha1.MTLSPermissive} {
		if got, err := v1alpha1.ParseMTLSMode(in); err != nil || got != want {
			t.Errorf("v1alpha1.ParseMTLSMode(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := v1alpha1.ParseMTLSMode("DISABLE"); err == nil || err.Error() != `mTLS mode "DISABLE": want STRICT or PERMISSIVE` {
		t.Errorf("v1alpha1.ParseMTLSMode(DISABLE) error = %v", err)
	}
}
