// Package kubecluster runs a real Kubernetes cluster on one machine for
// tests and for trying mantlet, the way kind does with containers, but out
// of network namespaces and without Docker or a registry: a test harness,
// not part of the product.
//
// The cluster is a testbed (internal/testbed) with a control plane and
// nodes but no pods of its own. The control plane namespace runs etcd and
// kube-apiserver (internal/kubetest), kube-controller-manager and
// kube-scheduler. Each node namespace runs its own containerd (Debian's)
// with runc, a kubelet and kube-proxy (iptables mode, or nftables, or
// none); pods are wired by
// the CNI plugins of Debian's containernetworking-plugins (ptp, or bridge),
// in the node's pod CIDR of the testbed's address plan. The Kubernetes
// programs are built once per machine from the nested module
// test/kube/tools (make kube-binaries); the images (a pause image, an echo
// server and a client built from testapp, and the mantlet image of 'make
// image') are imported into every node's containerd.
//
// A node's processes share a mount namespace of their own (a slave of the
// machine's), where /run/netns, /run/containerd, /run/mantlet,
// /var/lib/cni, /var/log/containers, /var/lib/kubelet/device-plugins and
// /sys/fs/bpf are fresh, as on a machine of its own; they live in a
// cgroup tree of their own (/kubecluster/<cluster>-<node> in every cgroup
// v1 hierarchy), which is also the kubelet's cgroup root. Close kills everything in those trees,
// which ends the mount namespaces and with them every mount the node
// made; then it removes the cgroups, the testbed and the files. A cluster
// whose process died is removed by the next Up (or Down).
//
// See docs/kubecluster.md.
package kubecluster

import (
	"net/netip"
	"time"
)

// CNI plugins a cluster can wire its pods with.
const (
	// CNIPtp gives each pod a point-to-point veth and a /32 route on the
	// node (a routed CNI, as mantlet expects).
	CNIPtp = "ptp"
	// CNIBridge puts every pod of a node on a Linux bridge.
	CNIBridge = "bridge"
)

// Modes kube-proxy can run a cluster's Services in.
const (
	// ProxyIPTables runs kube-proxy in iptables mode (the default).
	ProxyIPTables = "iptables"
	// ProxyNFTables runs kube-proxy in nftables mode; it needs the nft
	// program (Debian's nftables).
	ProxyNFTables = "nftables"
	// ProxyNone runs no kube-proxy: nothing on the nodes translates a
	// Service's ClusterIP.
	ProxyNone = "none"
)

// Defaults.
const (
	// DefaultNodes is the number of nodes.
	DefaultNodes = 2
	// DefaultStateDir records the clusters of this machine, so that one
	// whose process died can be removed.
	DefaultStateDir = "/run/mantlet/kubecluster"
	// DefaultRunRoot holds each cluster's files (configurations, node
	// state, logs).
	DefaultRunRoot = "/var/tmp/kubecluster"
	// ReadyTimeout bounds Up's waits (API server, nodes Ready).
	ReadyTimeout = 3 * time.Minute
)

// ClusterCIDR holds every node's pod CIDR (the testbed's 198.19.n.0/24).
var ClusterCIDR = netip.MustParsePrefix("198.19.0.0/16")
