package agent

import "errors"

// ErrNotPodRoute is wrapped by RouteLinks.PodLink when the node has no
// route that leads to a pod's veth for the address: the pod is not on this
// node (yet), or the CNI is not a routed one.
var ErrNotPodRoute = errors.New("no host route to a pod veth (mantlet needs a routed CNI: one /32 route per local pod, through its veth)")
