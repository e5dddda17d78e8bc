// Package bpf loads, attaches and manages mantlet's eBPF data path: the tc
// programs on enrolled pods' veths and on the node's uplinks, the sk_lookup
// program that hands captured connections to the ztunnel's listeners, and
// the pinned maps and links that let traffic keep flowing while the agent
// restarts. See docs/datapath.md.
package bpf
