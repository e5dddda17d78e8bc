//go:build linux

package testbed

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// New builds the testbed described by spec. It first claims the prefix with
// a state file, then creates the namespaces, links, addresses and routes;
// if anything fails, or ctx is cancelled, it removes everything it made and
// returns the error. The caller must Close the testbed.
func New(ctx context.Context, spec Spec, opts ...Option) (*Testbed, error) {
	o, err := resolveOptions(opts)
	if err != nil {
		return nil, err
	}
	tb, err := layout(spec, o.prefix)
	if err != nil {
		return nil, err
	}
	tb.stateDir, tb.log = o.stateDir, o.log.With("testbed", tb.prefix)
	if err := claimState(tb.stateDir, state{Prefix: tb.prefix, Created: time.Now().UTC(), PID: os.Getpid(), Spec: spec}); err != nil {
		return nil, err
	}
	b := &builder{tb: tb, ctx: ctx, failAfter: o.failAfter, plainNetnsDir: o.plainNetnsDir, handles: map[string]*nsHandles{}}
	start := time.Now()
	err = b.build()
	b.release()
	if err != nil {
		if cerr := tb.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("testbed: clean up after failed build: %w", cerr))
		}
		return nil, err
	}
	tb.log.Info("testbed up", "nodes", len(tb.nodes), "pods", len(tb.pods), "took", time.Since(start).Round(time.Millisecond))
	return tb, nil
}

// Open returns the testbed with prefix that another process built, from its
// state file. Closing it removes the testbed.
func Open(prefix string, opts ...Option) (*Testbed, error) {
	o, err := resolveOptions(append(opts, WithPrefix(prefix)))
	if err != nil {
		return nil, err
	}
	st, err := readState(o.stateDir, prefix)
	if err != nil {
		return nil, err
	}
	tb, err := layout(st.Spec, prefix)
	if err != nil {
		return nil, fmt.Errorf("testbed: state file %s: %w", stateFile(o.stateDir, prefix), err)
	}
	tb.stateDir, tb.log = o.stateDir, o.log.With("testbed", prefix)
	return tb, nil
}

// Remove removes the testbed with prefix: every namespace whose name it
// owns (whether or not its state file survived) and the state file. If a
// namespace remains, the error names it and the state file stays.
func Remove(prefix string, opts ...Option) error {
	o, err := resolveOptions(append(opts, WithPrefix(prefix)))
	if err != nil {
		return err
	}
	return removeTestbed(prefix, o.stateDir, o.log.With("testbed", prefix))
}

// RemoveAll removes every testbed recorded in the state directory and
// returns the prefixes it removed.
func RemoveAll(opts ...Option) ([]string, error) {
	infos, err := List(opts...)
	if err != nil {
		return nil, err
	}
	var done []string
	var errs []error
	for _, info := range infos {
		if err := Remove(info.Prefix, opts...); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, info.Prefix)
	}
	return done, errors.Join(errs...)
}

// Close removes every namespace of the testbed (and with them every link,
// address and route) and its state file. It is idempotent and returns all
// errors met on the way; if a namespace remains, its error names it and the
// state file stays, so that Remove can try again.
func (tb *Testbed) Close() error {
	tb.closeOnce.Do(func() { tb.closeErr = removeTestbed(tb.prefix, tb.stateDir, tb.log) })
	return tb.closeErr
}

func removeTestbed(prefix, stateDir string, log *slog.Logger) error {
	paths, err := existingNamespaces(prefix)
	if err != nil {
		return err
	}
	var errs []error
	var remain []string
	inodes := map[uint64]string{}
	for _, p := range paths {
		r, err := removeNamespace(p)
		if err != nil {
			errs = append(errs, err)
		}
		// What counts is what is left, whatever the errors said.
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			remain = append(remain, p)
			continue
		}
		if r.ino != 0 {
			inodes[r.ino] = p
		}
		if r.covered {
			log.Warn("namespace was hidden under a later mount of "+netnsDir+" (an 'ip netns add' that found it a plain directory?); removed it through a private mount namespace", "ns", p)
		}
	}
	if holders := namespaceHolders(inodes); len(holders) > 0 {
		// The links are gone already; the namespaces live on, empty, until
		// these processes exit.
		for ns, pids := range holders {
			log.Warn("namespace removed but still used by processes", "ns", ns, "pids", pids)
		}
	}
	if len(remain) > 0 {
		// Keep the state file, so that the testbed is still listed and
		// 'testbed down' can try again.
		summary := fmt.Errorf("testbed %s: %d of %d namespaces remain: %s (the state file stays, to remove them later)",
			prefix, len(remain), len(paths), strings.Join(remain, ", "))
		return errors.Join(append([]error{summary}, errs...)...)
	}
	for _, f := range []string{manifestFile(stateDir, prefix), stateFile(stateDir, prefix)} {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("testbed: remove %s: %w", f, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("testbed removed", "namespaces", len(paths))
	return nil
}

// namespaceHolders finds the processes whose network namespace is one of
// inodes.
func namespaceHolders(inodes map[uint64]string) map[string][]int {
	if len(inodes) == 0 {
		return nil
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	holders := map[string][]int{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) != nil {
			continue
		}
		if ns, ok := inodes[st.Ino]; ok {
			holders[ns] = append(holders[ns], pid)
		}
	}
	return holders
}

// nsHandles is an open namespace and a netlink handle in it.
type nsHandles struct {
	ns netns.NsHandle
	nl *netlink.Handle
}

type builder struct {
	tb        *Testbed
	ctx       context.Context
	failAfter int
	steps     int
	handles   map[string]*nsHandles
	// plainNetnsDir: see options.
	plainNetnsDir bool
}

// errInjected is the failure of a test's WithFailAfter step.
var errInjected = errors.New("injected failure")

// step marks the start of one unit of work: it stops the build when ctx is
// done (Ctrl-C) or a test asked for a failure here.
func (b *builder) step(what string) error {
	b.steps++
	if err := b.ctx.Err(); err != nil {
		return fmt.Errorf("testbed: %s: %w", what, err)
	}
	if b.failAfter > 0 && b.steps >= b.failAfter {
		return fmt.Errorf("testbed: %s: %w", what, errInjected)
	}
	return nil
}

func (b *builder) release() {
	for _, h := range b.handles {
		h.nl.Close()
		h.ns.Close()
	}
}

func (b *builder) build() error {
	tb := b.tb
	if b.plainNetnsDir {
		if err := os.MkdirAll(netnsDir, 0o755); err != nil {
			return fmt.Errorf("testbed: create %s: %w", netnsDir, err)
		}
	} else if err := shareNetnsDir(); err != nil {
		return err
	}
	if err := b.namespace(tb.underlay, false); err != nil {
		return err
	}
	for _, n := range tb.nodes {
		if err := b.namespace(n.NS, true); err != nil {
			return err
		}
	}
	for _, p := range tb.pods {
		if err := b.namespace(p.NS, false); err != nil {
			return err
		}
	}
	if cp := tb.controlPlane; cp != nil {
		if err := b.namespace(cp.NS, false); err != nil {
			return err
		}
	}
	if err := b.step("underlay bridge"); err != nil {
		return err
	}
	ul := b.handles[tb.underlay].nl
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName}}
	if err := ul.LinkAdd(br); err != nil {
		return fmt.Errorf("testbed: create bridge: %w", err)
	}
	if err := ul.LinkSetUp(br); err != nil {
		return fmt.Errorf("testbed: bring up bridge: %w", err)
	}
	for i, n := range tb.nodes {
		if err := b.uplink(i, n, br); err != nil {
			return err
		}
	}
	if cp := tb.controlPlane; cp != nil {
		if err := b.controlPlane(cp, br); err != nil {
			return err
		}
	}
	for _, n := range tb.nodes {
		for _, p := range n.Pods {
			if err := b.pod(n, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// namespace creates a named namespace, brings its loopback up and sets its
// sysctls: no IPv6 (so the underlay carries only what tests send), and
// forwarding on nodes.
func (b *builder) namespace(path string, forward bool) error {
	if err := b.step("create namespace " + path); err != nil {
		return err
	}
	h, err := createNamed(path)
	if err != nil {
		return err
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		return fmt.Errorf("testbed: netlink handle in %s: %w", path, err)
	}
	b.handles[path] = &nsHandles{ns: h, nl: nl}
	sysctls := map[string]string{
		"net/ipv6/conf/all/disable_ipv6":     "1",
		"net/ipv6/conf/default/disable_ipv6": "1",
	}
	if forward {
		sysctls["net/ipv4/ip_forward"] = "1"
	}
	if err := setSysctls(h, sysctls); err != nil {
		return fmt.Errorf("testbed: namespace %s: %w", path, err)
	}
	lo, err := nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("testbed: namespace %s: loopback: %w", path, err)
	}
	if err := nl.LinkSetUp(lo); err != nil {
		return fmt.Errorf("testbed: namespace %s: bring up loopback: %w", path, err)
	}
	b.tb.log.Debug("namespace created", "ns", path)
	return nil
}

// uplink joins node n (index i) to the bridge: a veth made in the underlay
// namespace whose peer is born in the node's namespace, so that no link
// ever exists in the root namespace.
func (b *builder) uplink(i int, n *Node, br *netlink.Bridge) error {
	if err := b.step("uplink of node " + n.Name); err != nil {
		return err
	}
	ul, node := b.handles[b.tb.underlay], b.handles[n.NS]
	port := bridgePort(i)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: port, MasterIndex: br.Index},
		PeerName:      n.Uplink,
		PeerNamespace: netlink.NsFd(node.ns),
	}
	if err := ul.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("testbed: node %s: create uplink: %w", n.Name, err)
	}
	if err := ul.nl.LinkSetUp(veth); err != nil {
		return fmt.Errorf("testbed: node %s: bring up bridge port: %w", n.Name, err)
	}
	up, err := node.nl.LinkByName(n.Uplink)
	if err != nil {
		return fmt.Errorf("testbed: node %s: find uplink: %w", n.Name, err)
	}
	addr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(n.IP, NodeCIDR.Bits()))}
	if err := node.nl.AddrAdd(up, addr); err != nil {
		return fmt.Errorf("testbed: node %s: address uplink: %w", n.Name, err)
	}
	if err := node.nl.LinkSetUp(up); err != nil {
		return fmt.Errorf("testbed: node %s: bring up uplink: %w", n.Name, err)
	}
	for _, other := range b.tb.nodes {
		if other == n {
			continue
		}
		r := &netlink.Route{LinkIndex: up.Attrs().Index, Dst: ipNet(other.PodCIDR), Gw: other.IP.AsSlice()}
		if err := node.nl.RouteAdd(r); err != nil {
			return fmt.Errorf("testbed: node %s: route to %s via %s: %w", n.Name, other.PodCIDR, other.IP, err)
		}
	}
	return nil
}

// pod joins pod p to node n the way a routed CNI does: host veth in the
// node with a /32 route to the pod, eth0 in the pod with a /32 address and a
// default route via a link-local gateway answered by a permanent neighbour
// entry (no ARP for the gateway, no proxy ARP needed).
func (b *builder) pod(n *Node, p *Pod) error {
	if err := b.step("pod " + p.Name); err != nil {
		return err
	}
	node, pod := b.handles[n.NS], b.handles[p.NS]
	mac, _ := net.ParseMAC(HostVethMAC)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth, HardwareAddr: mac},
		PeerName:      PodInterface,
		PeerNamespace: netlink.NsFd(pod.ns),
	}
	if err := node.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("testbed: pod %s: create veth: %w", p.Name, err)
	}
	host, err := node.nl.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("testbed: pod %s: find host veth: %w", p.Name, err)
	}
	if err := node.nl.LinkSetUp(host); err != nil {
		return fmt.Errorf("testbed: pod %s: bring up host veth: %w", p.Name, err)
	}
	eth, err := pod.nl.LinkByName(PodInterface)
	if err != nil {
		return fmt.Errorf("testbed: pod %s: find eth0: %w", p.Name, err)
	}
	if err := pod.nl.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(p.IP, 32))}); err != nil {
		return fmt.Errorf("testbed: pod %s: address eth0: %w", p.Name, err)
	}
	if err := pod.nl.LinkSetUp(eth); err != nil {
		return fmt.Errorf("testbed: pod %s: bring up eth0: %w", p.Name, err)
	}
	gw := netip.PrefixFrom(PodGateway, 32)
	routes := []struct {
		h    *netlink.Handle
		r    *netlink.Route
		what string
	}{
		{node.nl, &netlink.Route{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IP, 32)), Scope: netlink.SCOPE_LINK}, "node route to pod"},
		{pod.nl, &netlink.Route{LinkIndex: eth.Attrs().Index, Dst: ipNet(gw), Scope: netlink.SCOPE_LINK}, "pod route to gateway"},
		{pod.nl, &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: PodGateway.AsSlice()}, "pod default route"},
	}
	for _, r := range routes {
		if err := r.h.RouteAdd(r.r); err != nil {
			return fmt.Errorf("testbed: pod %s: %s: %w", p.Name, r.what, err)
		}
	}
	neigh := &netlink.Neigh{
		LinkIndex: eth.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: PodGateway.AsSlice(), HardwareAddr: mac,
	}
	if err := pod.nl.NeighAdd(neigh); err != nil {
		return fmt.Errorf("testbed: pod %s: gateway neighbour: %w", p.Name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func setSysctls(h netns.NsHandle, kv map[string]string) error {
	return onThread(func() error {
		if err := netns.Set(h); err != nil {
			return fmt.Errorf("enter namespace: %w", err)
		}
		for k, v := range kv {
			err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0)
			if errors.Is(err, fs.ErrNotExist) && strings.HasPrefix(k, "net/ipv6/") {
				continue // the kernel has no IPv6: nothing to disable
			}
			if err != nil {
				return fmt.Errorf("sysctl %s: %w", strings.ReplaceAll(k, "/", "."), err)
			}
		}
		return nil
	})
}

// onThread runs fn on a locked OS thread of its own and then returns that
// thread to the network namespace it started in. If that fails the thread
// stays locked and dies with its goroutine, so no goroutine ever runs in a
// namespace it did not ask for. A panic in fn is re-raised in the caller.
func onThread(fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("testbed: current namespace: %w", err)}
			return
		}
		defer orig.Close()
		var res result
		func() {
			defer func() { res.panic = recover() }()
			res.err = fn()
		}()
		if err := netns.Set(orig); err != nil {
			res.err = errors.Join(res.err, fmt.Errorf("testbed: return to namespace: %w", err))
			done <- res
			return // the locked thread exits with the goroutine
		}
		runtime.UnlockOSThread()
		done <- res
	}()
	res := <-done
	if res.panic != nil {
		panic(res.panic)
	}
	return res.err
}

// inNamespace runs fn on a locked OS thread inside the namespace at path.
func inNamespace(path string, fn func() error) error {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("testbed: open namespace %s: %w", path, err)
	}
	defer h.Close()
	return onThread(func() error {
		if err := netns.Set(h); err != nil {
			return fmt.Errorf("testbed: enter namespace %s: %w", path, err)
		}
		return fn()
	})
}

func command(ctx context.Context, path, name string, args []string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, "--", name}, args...)...)
}

func dial(ctx context.Context, path, network, address string) (net.Conn, error) {
	var c net.Conn
	err := inNamespace(path, func() error {
		var err error
		var d net.Dialer
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

func listen(ctx context.Context, path, network, address string) (net.Listener, error) {
	var l net.Listener
	err := inNamespace(path, func() error {
		var err error
		var lc net.ListenConfig
		l, err = lc.Listen(ctx, network, address)
		return err
	})
	return l, err
}
