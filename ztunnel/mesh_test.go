// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/rawtcp"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The in-process mesh: two ztunnels on loopback, "node-a" owning pods
// 127.0.1.x and "node-b" owning 127.0.2.x. Each ztunnel listens on
// 0.0.0.0 with its own ports, so a connection to 127.0.2.1:<hbone port of
// node-b> arrives at node-b's ztunnel with LocalAddr 127.0.2.1, as the
// capture would deliver it. Outbound connections are dialled to the
// destination IP at the node's outbound port; the test listener reports
// the intended destination port as the original destination.

var (
	ipA1      = netip.MustParseAddr("127.0.1.1") // shop/frontend on node-a
	ipA2      = netip.MustParseAddr("127.0.1.2") // shop/checkout on node-a
	ipB1      = netip.MustParseAddr("127.0.2.1") // shop/checkout on node-b
	ipB2      = netip.MustParseAddr("127.0.2.2") // shop/admin on node-b
	ipOutside = netip.MustParseAddr("127.0.3.1") // not in the mesh
	ipUnmesh  = netip.MustParseAddr("127.0.3.2") // in the snapshot, not enrolled
	ipVIP     = netip.MustParseAddr("127.0.4.1") // service checkout, port 80 -> b1
)

type node struct {
	name  string
	p     *ztunnel.Proxy
	out   uint16 // outbound port
	hbone uint16 // HBONE port
	plain uint16 // inbound plaintext port (meshOpts.plaintext)
	flows chan *ztunnel.FlowRecord
	orig  *origMap // client AddrPort -> original destination
}

type mesh struct {
	t     testing.TB
	ca    *ztest.CA
	caB   *ztest.CA // node-b's, with meshOpts.federated
	store *workload.Store
	nodes map[string]*node
	apps  map[netip.Addr]*app
	td    spiffeid.TrustDomain
	// via, if set, is where the ztunnels dial HBONE instead of the
	// destination's node: a relay the test can cut.
	via atomic.Pointer[netip.AddrPort]
}

type meshOpts struct {
	tuning    ztunnel.Config // only Tuning, ConnectTimeout, MaxFlows, OnFlowOpen, OnReject, Limits are used
	authz     map[string]ztunnel.Authorizer
	svids     map[string]ztunnel.SVIDSource
	plaintext bool         // give each node an inbound plaintext listener
	logger    *slog.Logger // instead of testLogger
	// federated puts node-a's workloads in trust domain a.test (CA ca)
	// and node-b's in b.test (CA caB), each ztunnel trusting its own
	// domain and, through a federated bundle file, the other's, unless
	// its node is in unfederated.
	federated   bool
	unfederated map[string]bool
	// keyExchange sets a node's Tuning.KeyExchange.
	keyExchange map[string]hbone.KeyExchange
}

// tuningOf is node name's Tuning in o.
func tuningOf(o meshOpts, name string) hbone.Tuning {
	t := o.tuning.Tuning
	if k, ok := o.keyExchange[name]; ok {
		t.KeyExchange = k
	}
	return t
}

func newMesh(t testing.TB, o meshOpts) *mesh {
	t.Helper()
	m := &mesh{
		t:     t,
		ca:    ztest.NewCA(t, "cluster.local", ca.Options{}),
		store: workload.NewStore(),
		nodes: map[string]*node{},
		apps:  map[netip.Addr]*app{},
		td:    spiffeid.RequireTrustDomainFromString("cluster.local"),
	}
	var tdOf map[string]spiffeid.TrustDomain // node → its workloads' trust domain
	if o.federated {
		m.ca, m.caB = ztest.NewCA(t, "a.test", ca.Options{}), ztest.NewCA(t, "b.test", ca.Options{})
		m.td = m.ca.TrustDomain()
		tdOf = map[string]spiffeid.TrustDomain{"node-a": m.ca.TrustDomain(), "node-b": m.caB.TrustDomain()}
	}
	for _, ip := range []netip.Addr{ipA1, ipA2, ipB1, ipB2, ipOutside, ipUnmesh} {
		m.apps[ip] = startApp(t, ip)
	}
	wl := func(uid, name, sa, nodeName string, ip netip.Addr, enrolled bool) workload.Workload {
		return workload.Workload{UID: uid, Name: name, Namespace: "shop", ServiceAccount: sa, Node: nodeName,
			IPs: []netip.Addr{ip}, Enrolled: enrolled, TrustDomain: tdOf[nodeName]}
	}
	snap, err := workload.New(
		[]workload.Node{{Name: "node-a", IP: netip.MustParseAddr("127.0.0.11")}, {Name: "node-b", IP: netip.MustParseAddr("127.0.0.12")}},
		[]workload.Workload{
			wl("a1", "frontend-0", "frontend", "node-a", ipA1, true),
			wl("a2", "checkout-1", "checkout", "node-a", ipA2, true),
			wl("b1", "checkout-0", "checkout", "node-b", ipB1, true),
			wl("b2", "admin-0", "admin", "node-b", ipB2, true),
			wl("u1", "legacy-0", "legacy", "node-b", ipUnmesh, false),
		},
		[]workload.Service{{Name: "checkout", Namespace: "shop", VIPs: []netip.Addr{ipVIP},
			Ports: []workload.ServicePort{{Port: 80, TargetPort: m.apps[ipB1].port}}, Endpoints: []string{"b1"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	m.store.Replace(snap)
	for _, name := range []string{"node-a", "node-b"} {
		m.nodes[name] = m.startNode(name, o)
	}
	return m
}

func testLogger(testing.TB) *slog.Logger {
	if os.Getenv("ZTUNNEL_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func (m *mesh) startNode(name string, o meshOpts) *node {
	t := m.t
	n := &node{name: name, flows: make(chan *ztunnel.FlowRecord, 4096), orig: newOrigMap()}
	outLn := listen(t)
	hbLn := listen(t)
	n.out = port(outLn)
	n.hbone = port(hbLn)
	var svids ztunnel.SVIDSource = m.ca
	td, bundles := m.td, m.ca.Bundles()
	if o.federated {
		own, other := m.ca, m.caB
		if name == "node-b" {
			own, other = m.caB, m.ca
		}
		svids, td, bundles = own, own.TrustDomain(), own.Bundles()
		if !o.unfederated[name] {
			bundles = federate(t, own, other)
		}
	}
	if s := o.svids[name]; s != nil {
		svids = s
	}
	logger := testLogger(t)
	if o.logger != nil {
		logger = o.logger
	}
	var plain net.Listener
	if o.plaintext {
		ln := listen(t)
		n.plain = port(ln)
		plain = newOrigDstListener(t, ln, n.orig)
	}
	p, err := ztunnel.New(ztunnel.Config{
		NodeName:    name,
		TrustDomain: td,
		Store:       m.store,
		SVIDs:       svids,
		Bundles:     bundles,
		Authorizer:  o.authz[name],
		Logger:      logger.With("node", name),
		Outbound:    newOrigDstListener(t, outLn, n.orig),
		HBONE:       hbLn,
		HBONEAddr: func(ip netip.Addr, w *workload.Workload) netip.AddrPort {
			if via := m.via.Load(); via != nil {
				return *via
			}
			return netip.AddrPortFrom(ip, m.nodes[w.Node].hbone)
		},
		ConnectTimeout: o.tuning.ConnectTimeout,
		MaxFlows:       o.tuning.MaxFlows,
		OnFlowOpen:     o.tuning.OnFlowOpen,
		OnReject:       o.tuning.OnReject,
		Tuning:         tuningOf(o, name),
		Limits:         o.tuning.Limits,

		InboundPlaintext: plain, // with meshOpts.plaintext
		OnFlowEnd: func(r *ztunnel.FlowRecord) {
			select {
			case n.flows <- r:
			default:
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	n.p = p
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: Run: %v", name, err)
		}
	})
	return n
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func port(ln net.Listener) uint16 { return uint16(ln.Addr().(*net.TCPAddr).Port) }

// dial opens an outbound connection from the pod at src to dst through
// the ztunnel of src's node.
func (m *mesh) dial(src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	return m.dialWith(bindDialer(src), dst)
}

// dialWith is dial with the pod's own dialer (bound to the pod's IP).
func (m *mesh) dialWith(d *net.Dialer, dst netip.AddrPort) (*net.TCPConn, error) {
	src, _ := netip.AddrFromSlice(d.LocalAddr.(*net.TCPAddr).IP.To4())
	n := m.nodeOf(src)
	c, err := d.Dial("tcp4", netip.AddrPortFrom(dst.Addr(), n.out).String())
	if err != nil {
		return nil, err
	}
	n.orig.Store(c.LocalAddr().(*net.TCPAddr).AddrPort(), dst)
	return c.(*net.TCPConn), nil
}

func (m *mesh) mustDial(src netip.Addr, dst netip.AddrPort) *net.TCPConn {
	m.t.Helper()
	c, err := m.dial(src, dst)
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { c.Close() })
	return c
}

func (m *mesh) nodeOf(ip netip.Addr) *node {
	if ip.As4()[2] == 1 {
		return m.nodes["node-a"]
	}
	return m.nodes["node-b"]
}

// appAddr is the echo app of the pod at ip.
func (m *mesh) appAddr(ip netip.Addr) netip.AddrPort { return netip.AddrPortFrom(ip, m.apps[ip].port) }

func (m *mesh) id(sa string) spiffeid.ID { return m.ca.ID("shop", sa) }

// flow waits for the next flow record of node n.
func (n *node) flow(t *testing.T) *ztunnel.FlowRecord {
	t.Helper()
	select {
	case r := <-n.flows:
		return r
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no flow ended", n.name)
		return nil
	}
}

// waitCount waits until flag's counter of n reaches want.
func (n *node) waitCount(t *testing.T, flag ztunnel.ResponseFlag, want uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n.p.Rejected(flag) < want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s counted %d times, want %d (counters %v)", n.name, flag, n.p.Rejected(flag), want, n.p.Counters())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// origDstListener reports, as an accepted conn's LocalAddr, the
// destination the test dialled, the way capture preserves it. It accepts
// as the agent does: sockets outside Go's poller (rawtcp).
type origDstListener struct {
	*rawtcp.Listener
	orig *origMap
}

// newOrigDstListener takes over ln (rawtcp.Listen), closed at the end of
// the test.
func newOrigDstListener(t testing.TB, ln net.Listener, orig *origMap) *origDstListener {
	t.Helper()
	rl, err := rawtcp.Listen(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rl.Close() })
	return &origDstListener{Listener: rl, orig: orig}
}

// origMap maps a client's address to the destination it dialled.
type origMap struct {
	mu   sync.Mutex
	cond *sync.Cond
	m    map[netip.AddrPort]netip.AddrPort
}

func newOrigMap() *origMap {
	o := &origMap{m: make(map[netip.AddrPort]netip.AddrPort)}
	o.cond = sync.NewCond(&o.mu)
	return o
}

func (o *origMap) Store(client, dst netip.AddrPort) {
	o.mu.Lock()
	o.m[client] = dst
	o.mu.Unlock()
	o.cond.Broadcast()
}

// take waits up to 2s for client's entry (the dialler stores it right
// after connect returns) and removes it.
func (o *origMap) take(client netip.AddrPort) (netip.AddrPort, bool) {
	t := time.AfterFunc(2*time.Second, o.cond.Broadcast)
	defer t.Stop()
	deadline := time.Now().Add(2 * time.Second)
	o.mu.Lock()
	defer o.mu.Unlock()
	for {
		if dst, ok := o.m[client]; ok {
			delete(o.m, client)
			return dst, true
		}
		if time.Now().After(deadline) {
			return netip.AddrPort{}, false
		}
		o.cond.Wait()
	}
}

func (l *origDstListener) Accept() (net.Conn, error) {
	c, err := l.AcceptConn()
	if err != nil {
		return nil, err
	}
	return &origDstConn{Conn: c, orig: l.orig}, nil
}

type origDstConn struct {
	*rawtcp.Conn
	orig *origMap
	once sync.Once
	dst  net.Addr
}

func (c *origDstConn) LocalAddr() net.Addr {
	c.once.Do(func() {
		c.dst = c.Conn.LocalAddr()
		if dst, ok := c.orig.take(c.RemoteAddr().(*net.TCPAddr).AddrPort()); ok {
			c.dst = net.TCPAddrFromAddrPort(dst)
		}
	})
	return c.dst
}

// app is a pod's server: it echoes, half-closing after the client did,
// and records its clients' addresses. An echo reads again only once its
// last write went out, which ties a connection's two directions together;
// bulk tests use bulkApp instead.
type app struct {
	port  uint16
	mu    sync.Mutex
	peers []netip.AddrPort
	// handle, if set, replaces the echo.
	handle func(c *net.TCPConn)
}

func startApp(t testing.TB, ip netip.Addr) *app {
	t.Helper()
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	a := &app{port: port(ln)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.mu.Lock()
			a.peers = append(a.peers, c.RemoteAddr().(*net.TCPAddr).AddrPort())
			h := a.handle
			a.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if h != nil {
					h(c.(*net.TCPConn))
					return
				}
				buf := hbone.GetBuf()
				defer hbone.PutBuf(buf)
				if _, err := io.CopyBuffer(writerOnlyT{c}, readerOnly{c}, *buf); err == nil {
					c.(*net.TCPConn).CloseWrite()
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return a
}

func (a *app) setHandler(h func(c *net.TCPConn)) {
	a.mu.Lock()
	a.handle = h
	a.mu.Unlock()
}

type readerOnly struct{ io.Reader }

// bindDialer dials from src; IP_BIND_ADDRESS_NO_PORT keeps bind() from
// scanning for a free port (slow once thousands of TIME_WAIT sockets exist).
func bindDialer(src netip.Addr) *net.Dialer {
	return &net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)),
		Control: func(_, _ string, c syscall.RawConn) error {
			return c.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, 24 /* IP_BIND_ADDRESS_NO_PORT */, 1)
			})
		},
	}
}

// smallBuffers returns a socket Control function that fixes the send and
// receive buffers at size bytes (the kernel doubles the value and turns
// autotuning off), after next.
func smallBuffers(size int, next func(string, string, syscall.RawConn) error) func(string, string, syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		if next != nil {
			if err := next(network, address, c); err != nil {
				return err
			}
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, size); serr == nil {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, size)
			}
		})
		if err == nil {
			err = serr
		}
		return err
	}
}
