// Package testbed builds a small cluster on one machine out of network
// namespaces, for the end-to-end tests, the demo and the benchmarks.
//
// Every node and every pod is a named network namespace under /run/netns.
// Pods join their node with a veth pair the way routed CNIs (Calico,
// kindnet) do it: in the node's namespace a host-side veth and a route
// "<podIP>/32 dev <host veth>"; in the pod, eth0 with the pod's IP and a
// default route via the link-local gateway 169.254.1.1. Nodes join an
// underlay bridge that lives in a namespace of its own. Addresses come from
// the RFC 2544 benchmarking range: node n is 198.18.0.n/24, its pods live in
// 198.19.n.0/24 (pod k of the node is 198.19.n.(10+k)), service virtual IPs
// in 198.18.128.0/20.
//
// The machine's root namespace gets nothing: no address, no route, no link.
// Names carry a per-run prefix so that testbeds built in parallel never
// collide, and a state file records what a testbed made so that another
// process (mantlet testbed down) can remove it.
package testbed

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Spec describes the cluster to build.
type Spec struct {
	// Nodes in order; node i (from 1) gets 198.18.0.i and pod CIDR
	// 198.19.i.0/24.
	Nodes []NodeSpec `json:"nodes"`
	// Namespaces maps a Kubernetes namespace to its annotations (for example
	// "mantlet.io/mesh": "enabled"). Namespaces that pods use but that are
	// not listed here appear in the manifest without annotations.
	Namespaces map[string]map[string]string `json:"namespaces,omitempty"`
	// Services get virtual IPs from 198.18.128.0/20, in order. The testbed
	// does not route them (there is no kube-proxy); they appear in the
	// manifest for the mesh to resolve.
	Services []ServiceSpec `json:"services,omitempty"`
	// ControlPlane adds a control plane: one more namespace on the
	// underlay, at ControlPlaneIP (see ControlPlane).
	ControlPlane bool `json:"controlPlane,omitempty"`
}

// NodeSpec describes one node.
type NodeSpec struct {
	// Name is the node's Kubernetes name (a DNS-1123 label).
	Name string `json:"name"`
	// Pods that run on the node, in order; pod k (from 1) gets
	// 198.19.<node>.(10+k).
	Pods []PodSpec `json:"pods,omitempty"`
	// Annotations go to the node's metadata in the manifest.
	Annotations map[string]string `json:"annotations,omitempty"`
}

// PodSpec describes one pod.
type PodSpec struct {
	// Name is the pod's name (a DNS-1123 label), unique in the testbed.
	Name string `json:"name"`
	// Namespace is the pod's Kubernetes namespace; "default" when empty.
	Namespace string `json:"namespace,omitempty"`
	// ServiceAccount is the pod's service account; "default" when empty.
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// Labels and Annotations go to the pod's metadata in the manifest.
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// ServiceSpec describes a Kubernetes-style service.
type ServiceSpec struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	// Selector picks the pods behind the service by their labels.
	Selector map[string]string `json:"selector,omitempty"`
	Ports    []ServicePort     `json:"ports"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name string `json:"name,omitempty"`
	Port uint16 `json:"port"`
	// TargetPort is the pods' port; Port when zero.
	TargetPort uint16 `json:"targetPort,omitempty"`
}

// The address plan.
var (
	// NodeCIDR holds the nodes' underlay addresses.
	NodeCIDR = netip.MustParsePrefix("198.18.0.0/24")
	// ServiceCIDR holds the services' virtual IPs.
	ServiceCIDR = netip.MustParsePrefix("198.18.128.0/20")
	// PodGateway is the link-local default gateway of every pod.
	PodGateway = netip.MustParseAddr("169.254.1.1")
)

// Interface names. They live only inside the testbed's namespaces, so they
// need no prefix to be unique.
const (
	// UplinkName is the node's interface on the underlay.
	UplinkName = "eth0"
	// PodInterface is the pod's interface.
	PodInterface = "eth0"
	// BridgeName is the underlay bridge, in the underlay namespace.
	BridgeName = "br0"
)

// HostVethMAC is the address of every host-side pod veth. Pods reach their
// gateway through a permanent neighbour entry for it.
const HostVethMAC = "ee:ee:ee:ee:ee:ee"

// Limits of the address plan.
const (
	maxNodes       = 250
	maxPodsPerNode = 240
	maxPrefixLen   = 12
)

// DefaultStateDir is where testbeds record what they made.
const DefaultStateDir = "/run/mantlet/testbed"

// netnsDir is where named network namespaces are bound.
const netnsDir = "/run/netns"

// Option configures New and Open.
type Option func(*options)

type options struct {
	prefix   string
	log      *slog.Logger
	stateDir string
	// failAfter makes New fail at its nth step (tests of the clean-up).
	failAfter int
	// plainNetnsDir makes New bind its namespaces in /run/netns as it
	// finds it, without making it a shared mount first, as mantlet did
	// before (tests of covered namespaces).
	plainNetnsDir bool
}

// WithPrefix names the testbed; every namespace name starts with
// "<prefix>-". A prefix is 1 to 12 lower-case letters and digits. The
// default is "tb" and six random hex digits.
func WithPrefix(p string) Option { return func(o *options) { o.prefix = p } }

// WithLogger logs what the testbed builds and removes (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithStateDir sets where the state file goes (default DefaultStateDir).
func WithStateDir(dir string) Option { return func(o *options) { o.stateDir = dir } }

// Testbed is a cluster of network namespaces. Its methods are safe for
// concurrent use.
type Testbed struct {
	prefix    string
	stateDir  string
	log       *slog.Logger
	underlay  string
	nodes     []*Node
	pods      []*Pod
	services  []*Service
	closeOnce sync.Once
	closeErr  error

	mu   sync.Mutex
	spec Spec // annotations change with SetNamespaceAnnotations

	// controlPlane is nil unless the spec asks for one.
	controlPlane *ControlPlane
}

// Node is one node: a network namespace with an uplink on the underlay.
type Node struct {
	Name string
	// IP is the node's address on the underlay (InternalIP).
	IP netip.Addr
	// PodCIDR holds the node's pods' addresses.
	PodCIDR netip.Prefix
	// NS is the path of the node's network namespace, for nsenter --net.
	NS string
	// Uplink is the node's interface on the underlay.
	Uplink string
	// Pods are the node's pods, in spec order.
	Pods []*Pod
}

// Pod is one pod: a network namespace joined to its node by a veth pair.
type Pod struct {
	Name, Namespace, ServiceAccount string
	// Node is the name of the pod's node.
	Node string
	// IP is the pod's address.
	IP netip.Addr
	// HostVeth is the name of the node-side veth, in the node's namespace;
	// the node routes IP/32 to it.
	HostVeth string
	// NS is the path of the pod's network namespace.
	NS string
}

// Service is a service with its virtual IP.
type Service struct {
	Name, Namespace string
	IP              netip.Addr
	Selector        map[string]string
	Ports           []ServicePort
}

// Prefix returns the testbed's name prefix.
func (tb *Testbed) Prefix() string { return tb.prefix }

// Underlay returns the path of the network namespace that holds the
// underlay bridge.
func (tb *Testbed) Underlay() string { return tb.underlay }

// StateFile returns the path of the testbed's state file.
func (tb *Testbed) StateFile() string { return stateFile(tb.stateDir, tb.prefix) }

// Node returns the node called name, or nil.
func (tb *Testbed) Node(name string) *Node {
	for _, n := range tb.nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Pod returns the pod called name, or nil.
func (tb *Testbed) Pod(name string) *Pod {
	for _, p := range tb.pods {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// Nodes returns the nodes in spec order.
func (tb *Testbed) Nodes() []*Node { return slices.Clone(tb.nodes) }

// Pods returns all pods, node by node, in spec order.
func (tb *Testbed) Pods() []*Pod { return slices.Clone(tb.pods) }

// Services returns the services with their virtual IPs.
func (tb *Testbed) Services() []*Service { return slices.Clone(tb.services) }

// Spec returns a copy of the spec the testbed was built from, with the
// annotations as they are now.
func (tb *Testbed) Spec() Spec {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return cloneSpec(tb.spec)
}

// SetNamespaceAnnotations replaces the annotations of a Kubernetes
// namespace in what Manifest returns (nil removes them all). It changes
// nothing in the network.
func (tb *Testbed) SetNamespaceAnnotations(namespace string, annotations map[string]string) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if tb.spec.Namespaces == nil {
		tb.spec.Namespaces = map[string]map[string]string{}
	}
	tb.spec.Namespaces[namespace] = maps.Clone(annotations)
}

// SetPodAnnotations replaces the annotations of a pod in what Manifest
// returns. It reports whether the pod exists.
func (tb *Testbed) SetPodAnnotations(pod string, annotations map[string]string) bool {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	for i := range tb.spec.Nodes {
		for j := range tb.spec.Nodes[i].Pods {
			if p := &tb.spec.Nodes[i].Pods[j]; p.Name == pod {
				p.Annotations = maps.Clone(annotations)
				return true
			}
		}
	}
	return false
}

func cloneSpec(s Spec) Spec {
	c := Spec{Nodes: make([]NodeSpec, len(s.Nodes)), Services: make([]ServiceSpec, len(s.Services)), ControlPlane: s.ControlPlane}
	for i, n := range s.Nodes {
		c.Nodes[i] = NodeSpec{Name: n.Name, Pods: make([]PodSpec, len(n.Pods)), Annotations: maps.Clone(n.Annotations)}
		for j, p := range n.Pods {
			p.Labels = maps.Clone(p.Labels)
			p.Annotations = maps.Clone(p.Annotations)
			c.Nodes[i].Pods[j] = p
		}
	}
	if s.Namespaces != nil {
		c.Namespaces = make(map[string]map[string]string, len(s.Namespaces))
		for k, v := range s.Namespaces {
			c.Namespaces[k] = maps.Clone(v)
		}
	}
	for i, sv := range s.Services {
		sv.Selector = maps.Clone(sv.Selector)
		sv.Ports = slices.Clone(sv.Ports)
		c.Services[i] = sv
	}
	return c
}

// ValidatePrefix reports whether p can name a testbed.
func ValidatePrefix(p string) error {
	if p == "" || len(p) > maxPrefixLen {
		return fmt.Errorf("testbed: prefix %q: want 1 to %d characters", p, maxPrefixLen)
	}
	for _, r := range p {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') {
			return fmt.Errorf("testbed: prefix %q: want only lower-case letters and digits", p)
		}
	}
	return nil
}

// layout computes every name and address of the testbed from the spec. It
// touches nothing.
func layout(spec Spec, prefix string) (*Testbed, error) {
	if err := ValidatePrefix(prefix); err != nil {
		return nil, err
	}
	if len(spec.Nodes) == 0 {
		return nil, errors.New("testbed: spec has no nodes")
	}
	if len(spec.Nodes) > maxNodes {
		return nil, fmt.Errorf("testbed: spec has %d nodes, the address plan allows %d", len(spec.Nodes), maxNodes)
	}
	tb := &Testbed{
		prefix:   prefix,
		spec:     cloneSpec(spec),
		underlay: nsPath(prefix, "underlay", ""),
	}
	if spec.ControlPlane {
		tb.controlPlane = layoutControlPlane(prefix)
	}
	nodeNames := map[string]bool{}
	podNames := map[string]bool{}
	for i, ns := range spec.Nodes {
		if err := checkName("node", ns.Name); err != nil {
			return nil, err
		}
		if nodeNames[ns.Name] {
			return nil, fmt.Errorf("testbed: node %q appears twice", ns.Name)
		}
		nodeNames[ns.Name] = true
		if len(ns.Pods) > maxPodsPerNode {
			return nil, fmt.Errorf("testbed: node %q has %d pods, the address plan allows %d", ns.Name, len(ns.Pods), maxPodsPerNode)
		}
		idx := byte(i + 1)
		n := &Node{
			Name:    ns.Name,
			IP:      netip.AddrFrom4([4]byte{198, 18, 0, idx}),
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, idx, 0}), 24),
			NS:      nsPath(prefix, "node", ns.Name),
			Uplink:  UplinkName,
		}
		for k, ps := range ns.Pods {
			if err := checkName("pod", ps.Name); err != nil {
				return nil, err
			}
			if podNames[ps.Name] {
				return nil, fmt.Errorf("testbed: pod %q appears twice (pod names are unique in a testbed)", ps.Name)
			}
			podNames[ps.Name] = true
			p := &Pod{
				Name:           ps.Name,
				Namespace:      orDefault(ps.Namespace),
				ServiceAccount: orDefault(ps.ServiceAccount),
				Node:           ns.Name,
				IP:             netip.AddrFrom4([4]byte{198, 19, idx, byte(10 + k + 1)}),
				HostVeth:       fmt.Sprintf("veth%d", k+1),
				NS:             nsPath(prefix, "pod", ps.Name),
			}
			if err := checkName("namespace of pod "+ps.Name, p.Namespace); err != nil {
				return nil, err
			}
			n.Pods = append(n.Pods, p)
			tb.pods = append(tb.pods, p)
		}
		tb.nodes = append(tb.nodes, n)
	}
	svcIP := ServiceCIDR.Addr()
	for _, ss := range spec.Services {
		if err := checkName("service", ss.Name); err != nil {
			return nil, err
		}
		svcIP = svcIP.Next()
		if !ServiceCIDR.Contains(svcIP) {
			return nil, fmt.Errorf("testbed: too many services for %s", ServiceCIDR)
		}
		if len(ss.Ports) == 0 {
			return nil, fmt.Errorf("testbed: service %q has no ports", ss.Name)
		}
		tb.services = append(tb.services, &Service{
			Name:      ss.Name,
			Namespace: orDefault(ss.Namespace),
			IP:        svcIP,
			Selector:  maps.Clone(ss.Selector),
			Ports:     slices.Clone(ss.Ports),
		})
	}
	return tb, nil
}

// bridgePort names node i's port on the underlay bridge.
func bridgePort(i int) string { return fmt.Sprintf("port%d", i+1) }

func checkName(what, name string) error {
	if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
		return fmt.Errorf("testbed: %s name %q: %s", what, name, strings.Join(errs, "; "))
	}
	return nil
}

func orDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
}

// nsName returns the name of a testbed namespace under /run/netns:
// <prefix>-underlay, <prefix>-node-<name>, <prefix>-pod-<name>.
func nsName(prefix, kind, name string) string {
	if name == "" {
		return prefix + "-" + kind
	}
	return prefix + "-" + kind + "-" + name
}

func nsPath(prefix, kind, name string) string {
	return filepath.Join(netnsDir, nsName(prefix, kind, name))
}

// SimpleSpec returns a spec with nodes node1..nodeN and podsPerNode pods on
// each, named pod-<node>-<k>, all in namespace.
func SimpleSpec(nodes, podsPerNode int, namespace string) Spec {
	var s Spec
	for i := 1; i <= nodes; i++ {
		ns := NodeSpec{Name: fmt.Sprintf("node%d", i)}
		for k := 1; k <= podsPerNode; k++ {
			ns.Pods = append(ns.Pods, PodSpec{Name: fmt.Sprintf("pod-%d-%d", i, k), Namespace: namespace})
		}
		s.Nodes = append(s.Nodes, ns)
	}
	return s
}
