package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// PlainFlows ends a STRICT pod's plaintext connections with the kernel's
// socket diagnostics (inet_diag, SOCK_DESTROY), in the pod's network
// namespace:
//
//  1. The pod's namespace is the one at the other end of its host-side
//     veth: the veth's IFLA_LINK_NETNSID names it by its id in the node's
//     namespace, and the namespace files of /run/netns, /var/run/netns
//     (where container runtimes bind them) and /proc/*/ns/net are asked
//     for their id until one matches.
//  2. In that namespace, the established TCP sockets (and those still in
//     the handshake or half-closed) on a port the pod listens on, with a
//     local address of the pod's veth, are its server side. A socket's
//     client is kept when the pod itself holds the other end (a
//     connection inside the pod), when it is one of the node's addresses
//     (kubelet probes pass STRICT), or when the node's namespace holds the
//     other end: the ztunnel delivers connections from the client's own
//     address with IP_TRANSPARENT, so its socket there has local address
//     = the client, remote = the pod. Nothing else can hold such a socket
//     in the node's namespace.
//  3. The others are destroyed (SOCK_DESTROY, identified by their socket
//     cookie so that a reused address pair is never hit). The pod's
//     kernel aborts the socket: the application's next read or write
//     fails with ECONNABORTED, and the kernel sends the client a reset.
//     Should that reset be lost, the client's next segment reaches the
//     pod (STRICT drops only SYNs), finds no socket and is answered with
//     a reset too.
//
// Its methods are safe for concurrent use. Root (CAP_NET_ADMIN and
// CAP_SYS_ADMIN) is needed.
type PlainFlows struct {
	nodeIPs []netip.Addr
	rt      *netlink.Handle  // the node's namespace, NETLINK_ROUTE
	diag    *nl.SocketHandle // the node's namespace, NETLINK_SOCK_DIAG
	roots   []string         // directories of bound namespaces
	procDir string           // /proc
	newDiag func(netns.NsHandle) (*nl.NetlinkSocket, error)
}

// NewPlainFlows returns a PlainFlows for the calling thread's network
// namespace, which must be the node's (where the agent runs). nodeIPs are
// the node's own addresses, whose connections STRICT lets through.
func NewPlainFlows(nodeIPs []netip.Addr) (*PlainFlows, error) {
	rt, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("agent: plaintext flows: netlink: %w", err)
	}
	s, err := diagSocket()
	if err != nil {
		rt.Close()
		return nil, fmt.Errorf("agent: plaintext flows: %w", err)
	}
	var ips []netip.Addr
	for _, ip := range nodeIPs {
		ips = append(ips, ip.Unmap())
	}
	return &PlainFlows{nodeIPs: ips, rt: rt, diag: &nl.SocketHandle{Socket: s},
		roots: []string{"/run/netns", "/var/run/netns"}, procDir: "/proc", newDiag: diagSocketIn}, nil
}

// Close releases the netlink sockets.
func (p *PlainFlows) Close() {
	p.rt.Close()
	p.diag.Close()
}

// ClosePlaintext implements PlaintextCloser.
func (p *PlainFlows) ClosePlaintext(ctx context.Context, ifindex int, podIPs []netip.Addr) ([]netip.AddrPort, error) {
	ns, err := p.podNamespace(ctx, ifindex)
	if err != nil {
		return nil, err
	}
	s, err := p.newDiag(ns)
	ns.Close()
	if err != nil {
		return nil, fmt.Errorf("pod namespace of veth %d: %w", ifindex, err)
	}
	pod := &nl.SocketHandle{Socket: s}
	defer pod.Close()

	var socks []diagSock
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		got, err := dumpTCP(pod, family, podStates)
		if err != nil {
			return nil, fmt.Errorf("pod namespace of veth %d: %w", ifindex, err)
		}
		socks = append(socks, got...)
	}
	var closed []netip.AddrPort
	for _, sk := range plaintextVictims(socks, podIPs, p.nodeIPs) {
		if err := ctx.Err(); err != nil {
			return closed, err
		}
		// The ztunnel's socket: local address the client, remote the pod.
		switch _, err := getTCP(p.diag, sk.remote, sk.local); {
		case err == nil:
			continue
		case !errors.Is(err, unix.ENOENT):
			return closed, fmt.Errorf("look for the ztunnel's end of %s -> %s: %w", sk.remote, sk.local, err)
		}
		switch err := destroyTCP(pod, sk); {
		case err == nil:
			closed = append(closed, sk.remote)
		case errors.Is(err, unix.ENOENT):
			// Gone meanwhile.
		case errors.Is(err, unix.EOPNOTSUPP):
			return closed, fmt.Errorf("destroy %s -> %s: %w (the kernel needs CONFIG_INET_DIAG_DESTROY)", sk.remote, sk.local, err)
		default:
			return closed, fmt.Errorf("destroy %s -> %s: %w", sk.remote, sk.local, err)
		}
	}
	return closed, nil
}

// plaintextVictims returns the server side sockets of socks (all of one
// pod's namespace) whose client STRICT would not admit now, before the
// check for the ztunnel's end: on a local address of podIPs (IPv4, as
// STRICT is) and a port the pod listens on, from a client that is neither
// in the pod nor one of nodeIPs.
func plaintextVictims(socks []diagSock, podIPs, nodeIPs []netip.Addr) []diagSock {
	type pair struct{ local, remote netip.AddrPort }
	ends := map[pair]bool{}
	listening := map[uint16][]netip.Addr{}
	for _, sk := range socks {
		if sk.state == tcpListen {
			listening[sk.local.Port()] = append(listening[sk.local.Port()], sk.local.Addr())
			continue
		}
		ends[pair{sk.local, sk.remote}] = true
	}
	var out []diagSock
	for _, sk := range socks {
		if sk.state == tcpListen || !sk.local.Addr().Is4() || !slices.Contains(podIPs, sk.local.Addr()) {
			continue
		}
		server := slices.ContainsFunc(listening[sk.local.Port()], func(a netip.Addr) bool {
			return a.IsUnspecified() || a == sk.local.Addr()
		})
		peer := sk.remote.Addr()
		if !server || peer.IsLoopback() || slices.Contains(nodeIPs, peer) || ends[pair{sk.remote, sk.local}] {
			continue
		}
		out = append(out, sk)
	}
	return out
}

// podNamespace opens the network namespace at the other end of the veth
// ifindex of the node's namespace.
func (p *PlainFlows) podNamespace(ctx context.Context, ifindex int) (netns.NsHandle, error) {
	link, err := p.rt.LinkByIndex(ifindex)
	if err != nil {
		return netns.None(), fmt.Errorf("veth %d: %w", ifindex, err)
	}
	id := link.Attrs().NetNsID
	if id < 0 {
		return netns.None(), fmt.Errorf("veth %d (%s) has no peer namespace: its other end is in the node's namespace", ifindex, link.Attrs().Name)
	}
	seen := map[[2]uint64]bool{}
	// try opens path if it is a namespace not seen yet with the id.
	try := func(path string) (netns.NsHandle, bool) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil {
			return netns.None(), false
		}
		key := [2]uint64{uint64(st.Dev), uint64(st.Ino)}
		if seen[key] {
			return netns.None(), false
		}
		seen[key] = true
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return netns.None(), false
		}
		if got, err := p.rt.GetNetNsIdByFd(fd); err == nil && got == id {
			return netns.NsHandle(fd), true
		}
		unix.Close(fd)
		return netns.None(), false
	}
	for _, dir := range p.roots {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if ns, ok := try(filepath.Join(dir, e.Name())); ok {
				return ns, nil
			}
		}
	}
	procs, err := os.ReadDir(p.procDir)
	if err != nil {
		return netns.None(), fmt.Errorf("veth %d: find the pod's namespace: %w", ifindex, err)
	}
	for i, e := range procs {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				return netns.None(), err
			}
		}
		if ns, ok := try(filepath.Join(p.procDir, e.Name(), "ns", "net")); ok {
			return ns, nil
		}
	}
	return netns.None(), fmt.Errorf("veth %d (%s): no network namespace with id %d, its other end, under %s or %s/*/ns/net",
		ifindex, link.Attrs().Name, id, filepath.Join(p.roots...), p.procDir)
}

// TCP states (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpSynRecv     = 3
	tcpFinWait1    = 4
	tcpFinWait2    = 5
	tcpCloseWait   = 8
	tcpListen      = 10
)

// podStates are the states dumped from a pod's namespace: listeners and
// connections that can still carry data (SYN_RECV includes request
// sockets, which the kernel lists apart).
const podStates = 1<<tcpListen | 1<<tcpEstablished | 1<<tcpSynRecv | 1<<tcpFinWait1 | 1<<tcpFinWait2 | 1<<tcpCloseWait

// diagSock is one socket of an inet_diag answer.
type diagSock struct {
	family        uint8
	state         uint8
	local, remote netip.AddrPort // IPv4-mapped addresses unmapped
	id            diagID         // as the kernel sent it
}

// diagID is struct inet_diag_sockid; ports in host order.
type diagID struct {
	sport, dport uint16
	src, dst     [16]byte
	ifindex      uint32
	cookie       [2]uint32
}

const (
	sizeofDiagID  = 48
	sizeofDiagReq = 8 + sizeofDiagID
	sizeofDiagMsg = 4 + sizeofDiagID + 20
	noCookie      = ^uint32(0)
)

// diagReq is struct inet_diag_req_v2.
type diagReq struct {
	family, protocol uint8
	states           uint32
	id               diagID
}

func (r *diagReq) Len() int { return sizeofDiagReq }

func (r *diagReq) Serialize() []byte {
	b := make([]byte, sizeofDiagReq)
	ne := nl.NativeEndian()
	b[0], b[1] = r.family, r.protocol
	ne.PutUint32(b[4:], r.states)
	r.id.put(b[8:])
	return b
}

func (id *diagID) put(b []byte) {
	ne := nl.NativeEndian()
	binary.BigEndian.PutUint16(b[0:], id.sport)
	binary.BigEndian.PutUint16(b[2:], id.dport)
	copy(b[4:20], id.src[:])
	copy(b[20:36], id.dst[:])
	ne.PutUint32(b[36:], id.ifindex)
	ne.PutUint32(b[40:], id.cookie[0])
	ne.PutUint32(b[44:], id.cookie[1])
}

func parseDiagMsg(b []byte) (diagSock, error) {
	if len(b) < sizeofDiagMsg {
		return diagSock{}, fmt.Errorf("inet_diag: short message (%d bytes)", len(b))
	}
	ne := nl.NativeEndian()
	s := diagSock{family: b[0], state: b[1]}
	id := b[4:]
	s.id.sport = binary.BigEndian.Uint16(id[0:])
	s.id.dport = binary.BigEndian.Uint16(id[2:])
	copy(s.id.src[:], id[4:20])
	copy(s.id.dst[:], id[20:36])
	s.id.ifindex = ne.Uint32(id[36:])
	s.id.cookie = [2]uint32{ne.Uint32(id[40:]), ne.Uint32(id[44:])}
	addr := func(raw [16]byte) netip.Addr {
		if s.family == unix.AF_INET {
			return netip.AddrFrom4([4]byte(raw[:4]))
		}
		return netip.AddrFrom16(raw).Unmap()
	}
	s.local = netip.AddrPortFrom(addr(s.id.src), s.id.sport)
	s.remote = netip.AddrPortFrom(addr(s.id.dst), s.id.dport)
	return s, nil
}

// dumpTCP lists the TCP sockets of family in the states (a bit mask by
// state) of the namespace of h. A dump interrupted by changes is retried.
func dumpTCP(h *nl.SocketHandle, family uint8, states uint32) ([]diagSock, error) {
	for attempt := 0; ; attempt++ {
		req := diagRequest(h, nl.SOCK_DIAG_BY_FAMILY, unix.NLM_F_DUMP)
		req.AddData(&diagReq{family: family, protocol: unix.IPPROTO_TCP, states: states})
		var out []diagSock
		var perr error
		err := req.ExecuteIter(unix.NETLINK_INET_DIAG, nl.SOCK_DIAG_BY_FAMILY, func(msg []byte) bool {
			s, err := parseDiagMsg(msg)
			if err != nil {
				perr = err
				return false
			}
			out = append(out, s)
			return true
		})
		if errors.Is(err, netlink.ErrDumpInterrupted) && attempt < 3 {
			continue
		}
		if err == nil {
			err = perr
		}
		if err != nil {
			return nil, fmt.Errorf("inet_diag: list TCP sockets (family %d): %w", family, err)
		}
		return out, nil
	}
}

// getTCP finds the TCP socket local -> remote (IPv4) of h's namespace, in
// any state; the error wraps ENOENT when there is none.
func getTCP(h *nl.SocketHandle, local, remote netip.AddrPort) (diagSock, error) {
	id := diagID{sport: local.Port(), dport: remote.Port(), cookie: [2]uint32{noCookie, noCookie}}
	a4, b4 := local.Addr().As4(), remote.Addr().As4()
	copy(id.src[:], a4[:])
	copy(id.dst[:], b4[:])
	req := diagRequest(h, nl.SOCK_DIAG_BY_FAMILY, 0)
	req.AddData(&diagReq{family: unix.AF_INET, protocol: unix.IPPROTO_TCP, states: ^uint32(0), id: id})
	msgs, err := req.Execute(unix.NETLINK_INET_DIAG, nl.SOCK_DIAG_BY_FAMILY)
	if err != nil {
		return diagSock{}, err
	}
	if len(msgs) == 0 {
		return diagSock{}, unix.ENOENT
	}
	return parseDiagMsg(msgs[0])
}

// destroyTCP aborts sk (found by a dump of h's namespace), identified by
// its cookie too.
func destroyTCP(h *nl.SocketHandle, sk diagSock) error {
	req := diagRequest(h, nl.SOCK_DESTROY, unix.NLM_F_ACK)
	req.AddData(&diagReq{family: sk.family, protocol: unix.IPPROTO_TCP, states: ^uint32(0), id: sk.id})
	_, err := req.Execute(unix.NETLINK_INET_DIAG, 0)
	return err
}

func diagRequest(h *nl.SocketHandle, typ, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(typ, flags)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_INET_DIAG: h}
	return req
}

// diagTimeout bounds each wait for the kernel's answer.
var diagTimeout = unix.Timeval{Sec: 5}

// diagSocket opens a NETLINK_SOCK_DIAG socket in the calling thread's
// namespace.
func diagSocket() (*nl.NetlinkSocket, error) {
	s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_INET_DIAG)
	if err != nil {
		return nil, fmt.Errorf("inet_diag socket: %w", err)
	}
	if err := s.SetReceiveTimeout(&diagTimeout); err != nil {
		s.Close()
		return nil, fmt.Errorf("inet_diag socket: %w", err)
	}
	return s, nil
}

// diagSocketIn opens a NETLINK_SOCK_DIAG socket in the namespace ns: on a
// thread of its own that enters ns and returns to where it was; if it
// cannot return, the thread stays locked and ends with its goroutine, so
// no other goroutine ever runs in the pod's namespace.
func diagSocketIn(ns netns.NsHandle) (*nl.NetlinkSocket, error) {
	type result struct {
		s   *nl.NetlinkSocket
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("current namespace: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("enter: %w", err)}
			return
		}
		s, err := diagSocket()
		if rerr := netns.Set(orig); rerr != nil {
			if s != nil {
				s.Close()
			}
			done <- result{err: errors.Join(err, fmt.Errorf("return to the node's namespace: %w", rerr))}
			return // the thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		done <- result{s: s, err: err}
	}()
	r := <-done
	return r.s, r.err
}

var _ PlaintextCloser = (*PlainFlows)(nil)
