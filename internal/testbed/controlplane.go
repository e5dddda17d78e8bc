package testbed

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
)

// The control plane: one more namespace on the underlay, for processes that
// nodes reach over the node network as on a real cluster (the Kubernetes
// API server and etcd of internal/kubetest).

// ControlPlaneIP is the control plane's address on the underlay. Nodes take
// 198.18.0.1 to 198.18.0.250; 198.18.0.254 stays free for it.
var ControlPlaneIP = netip.MustParseAddr("198.18.0.254")

// controlPlanePort is the control plane's port on the underlay bridge.
const controlPlanePort = "portcp"

// ControlPlane is a network namespace on the underlay with the address
// ControlPlaneIP on its eth0 and a route to every node's pod CIDR via that
// node, so that nodes and pods reach it. It is not a node: it has no pods
// and is not in the manifest.
type ControlPlane struct {
	// IP is the control plane's address on the underlay.
	IP netip.Addr
	// NS is the path of its network namespace, for nsenter --net.
	NS string
	// Uplink is its interface on the underlay.
	Uplink string
}

// ControlPlane returns the control plane, or nil if the spec asked for
// none.
func (tb *Testbed) ControlPlane() *ControlPlane { return tb.controlPlane }

// layoutControlPlane names the control plane's namespace and address.
func layoutControlPlane(prefix string) *ControlPlane {
	return &ControlPlane{IP: ControlPlaneIP, NS: nsPath(prefix, controlPlaneKind, ""), Uplink: UplinkName}
}

// controlPlaneKind names the control plane's namespace: <prefix>-control-plane.
const controlPlaneKind = "control-plane"

// Do runs fn on a locked OS thread inside the control plane's namespace;
// see Node.Do.
func (c *ControlPlane) Do(fn func() error) error { return inNamespace(c.NS, fn) }

// Command returns a command that runs name inside the control plane's
// namespace; see Node.Command.
func (c *ControlPlane) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return command(ctx, c.NS, name, args)
}

// Dial connects from inside the control plane's namespace.
func (c *ControlPlane) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return dial(ctx, c.NS, network, address)
}

// Listen listens inside the control plane's namespace.
func (c *ControlPlane) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	return listen(ctx, c.NS, network, address)
}
