package node

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
)

// Datapath is what a node needs of its eBPF data path; *bpf.Datapath
// implements it.
type Datapath interface {
	agent.Datapath
	// AttachUplink attaches the uplink programs to an interface.
	AttachUplink(ifname string) error
	// SetListener puts a listener of the ztunnel into a SOCKMAP slot.
	SetListener(slot bpf.Slot, l syscall.Conn) error
	// Counters and Repairs feed the metrics and the admin API.
	Counters() (bpf.Counters, error)
	Repairs() map[bpf.Fault]uint64
	// Watch keeps the kernel state in place until ctx ends.
	Watch(ctx context.Context, interval time.Duration) error
	// Created reports whether Open made the data path (rather than
	// adopting a pinned one); Remove undoes one that Open made.
	Created() bool
	Remove(ctx context.Context) (bpf.CleanupReport, error)
	// Close releases the handles; programs and pins stay.
	Close() error
}

// Kernel is what a node asks of the machine: the data path, the ztunnel's
// listeners, the node's addresses and interfaces, the pods' veths and
// sockets. Kernel{} is the real one (root, Linux); tests of the wiring
// use fakes.
type Kernel interface {
	// OpenDatapath loads (or adopts) the eBPF data path.
	OpenDatapath(ctx context.Context, cfg bpf.Config, log *slog.Logger) (Datapath, error)
	// Listen opens a listener of the ztunnel, whose sockets carry mark.
	Listen(ctx context.Context, addr string, mark uint32) (net.Listener, error)
	// InterfaceAddrs returns the addresses of the node's interfaces.
	InterfaceAddrs() ([]netip.Addr, error)
	// FindUplinks names the interfaces that lead to other nodes.
	FindUplinks(nodeIPs []netip.Addr) ([]string, error)
	// Links finds pods' veths; close releases it.
	Links() (links agent.LinkFinder, close func(), err error)
	// Plaintext ends a pod's plaintext connections when it turns STRICT;
	// close releases it.
	Plaintext(nodeIPs []netip.Addr) (p agent.PlaintextCloser, close func(), err error)
}

// HostKernel is the real Kernel: package bpf and netlink on this machine.
type HostKernel struct{}

var _ Kernel = HostKernel{}

// OpenDatapath implements Kernel with bpf.Open.
func (HostKernel) OpenDatapath(ctx context.Context, cfg bpf.Config, log *slog.Logger) (Datapath, error) {
	d, err := bpf.Open(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return d, nil
}

// Listen implements Kernel with bpf.Listen (IP_TRANSPARENT, SO_MARK, no
// MPTCP).
func (HostKernel) Listen(ctx context.Context, addr string, mark uint32) (net.Listener, error) {
	return bpf.Listen(ctx, addr, mark)
}

// InterfaceAddrs implements Kernel.
func (HostKernel) InterfaceAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("node addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr())
		}
	}
	return out, nil
}

// FindUplinks implements Kernel with agent.FindUplinks.
func (HostKernel) FindUplinks(nodeIPs []netip.Addr) ([]string, error) {
	return agent.FindUplinks(nodeIPs)
}

// Links implements Kernel with the routes to the pods.
func (HostKernel) Links() (agent.LinkFinder, func(), error) {
	l, err := agent.NewRouteLinks()
	if err != nil {
		return nil, nil, err
	}
	return l, l.Close, nil
}

// Plaintext implements Kernel with agent.PlainFlows.
func (HostKernel) Plaintext(nodeIPs []netip.Addr) (agent.PlaintextCloser, func(), error) {
	p, err := agent.NewPlainFlows(nodeIPs)
	if err != nil {
		return nil, nil, err
	}
	return p, p.Close, nil
}
