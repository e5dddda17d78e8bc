package testbed

import (
	"context"
	"net"
	"os/exec"
)

// Do runs fn on a locked OS thread inside the node's network namespace and
// returns the thread to where it was afterwards. fn runs on a goroutine of
// its own, so it must not call t.Fatal; sockets it creates stay in the
// namespace and may be used after Do returns.
func (n *Node) Do(fn func() error) error { return inNamespace(n.NS, fn) }

// Command returns a command that runs name inside the node's network
// namespace through `nsenter --net=` (unlike `ip netns exec`, nsenter leaves
// /sys alone, so bpffs stays visible).
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return command(ctx, n.NS, name, args)
}

// Dial connects from inside the node's namespace.
func (n *Node) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return dial(ctx, n.NS, network, address)
}

// Listen listens inside the node's namespace.
func (n *Node) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	return listen(ctx, n.NS, network, address)
}

// Do runs fn on a locked OS thread inside the pod's network namespace; see
// Node.Do.
func (p *Pod) Do(fn func() error) error { return inNamespace(p.NS, fn) }

// Command returns a command that runs name inside the pod's network
// namespace; see Node.Command.
func (p *Pod) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return command(ctx, p.NS, name, args)
}

// Dial connects from inside the pod's namespace (from the pod's IP).
func (p *Pod) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return dial(ctx, p.NS, network, address)
}

// Listen listens inside the pod's namespace.
func (p *Pod) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	return listen(ctx, p.NS, network, address)
}
