// Package cni is the meeting point of mantlet's chained CNI plugin
// (cmd/mantlet-cni) and the node agent: the plugin, run by the container
// runtime when it wires a pod's sandbox, asks the agent over a unix
// socket to enroll the pod and waits for the answer before the runtime
// may start the pod's containers, so that a new pod's first connection is
// already captured. The package holds the request and answer of that
// exchange, the agent's side of it (Server) and the installation of the
// plugin into the node's CNI configuration (Install). It uses the standard
// library only, so that the plugin stays a small binary.
package cni

import (
	"net/netip"
	"slices"
	"strings"
)

// Defaults shared by the plugin, the agent and the chart.
const (
	// DefaultSocket is where the agent listens for the plugin.
	DefaultSocket = "/run/mantlet/cni.sock"
	// PluginType is the plugin's "type" in a CNI configuration, and the
	// name of its binary in the CNI bin directory.
	PluginType = "mantlet-cni"
	// DefaultTimeout bounds how long the plugin waits for the agent's
	// answer to an ADD.
	DefaultTimeout = 30
)

// DefaultExcludedNamespaces are the namespaces whose pods start even when
// the agent cannot be reached: the cluster's own.
var DefaultExcludedNamespaces = []string{"kube-system"}

// Command is the CNI operation the plugin runs.
type Command string

// The commands the plugin forwards to the agent.
const (
	Add   Command = "ADD"
	Del   Command = "DEL"
	Check Command = "CHECK"
)

// Request is what the plugin tells the agent about a pod's sandbox.
type Request struct {
	// Command is ADD, DEL or CHECK.
	Command Command `json:"command"`
	// Namespace, Name and UID name the pod (from CNI_ARGS' K8S_POD_*).
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid,omitempty"`
	// ContainerID is the sandbox's ID, Netns the path of its network
	// namespace.
	ContainerID string `json:"containerID,omitempty"`
	Netns       string `json:"netns,omitempty"`
	// IPs are the pod's addresses and HostInterface the host end of its
	// veth, as the plugins before mantlet's report them (empty for DEL).
	IPs           []netip.Addr `json:"ips,omitempty"`
	HostInterface string       `json:"hostInterface,omitempty"`
}

// Pod is namespace/name.
func (r *Request) Pod() string { return r.Namespace + "/" + r.Name }

// Response is the agent's answer.
type Response struct {
	// Meshed is true when the pod is in the mesh and its veth is enrolled
	// (its traffic is captured); false when the pod is not meshed.
	Meshed bool `json:"meshed"`
	// Ifindex is the enrolled veth (0 when not meshed).
	Ifindex int `json:"ifindex,omitempty"`
	// Error says why the pod could not be enrolled; the plugin fails
	// the ADD with it.
	Error string `json:"error,omitempty"`
}

// Excluded reports whether pods of namespace ns start without the agent.
func Excluded(ns string, excluded []string) bool {
	return slices.ContainsFunc(excluded, func(e string) bool { return strings.TrimSpace(e) == ns })
}
