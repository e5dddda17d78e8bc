package agent

import "errors"

// ErrNotPodRoute is wrapped by RouteLinks.PodLink when the node has no
// route that leads to a pod's veth for the address: the pod is not on this
// node (yet), or the CNI is not a routed one.
var ErrNotPodRoute = errors.New("no host route to a pod veth (mantlet needs a routed CNI: one /32 route per local pod, through its veth)")

// ErrBridgedCNI is wrapped by RouteLinks.PodLink when the pod's address
// leads to a Linux bridge (a bridge CNI such as the reference `bridge`
// plugin), or the pod's veth is a bridge port. mantlet cannot capture such
// a pod: traffic between two pods of the bridge is switched without ever
// being routed, so it would bypass the ztunnel. The agent refuses such a
// pod and never enrolls it (see Agent and PodStatus.Reason).
var ErrBridgedCNI = errors.New("bridged CNI is not supported (mantlet needs a routed CNI: one /32 route per local pod, through its veth)")

// ReasonBridgedCNI is PodStatus.Reason for a pod refused because of
// ErrBridgedCNI; it is also the reason of the pod's Meshed condition.
const ReasonBridgedCNI = "BridgedCNINotSupported"
