//go:build linux

package testbed

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var (
	usedMu       sync.Mutex
	usedPrefixes []string
)

// TestMain fails the run when a testbed of this package outlived its test.
func TestMain(m *testing.M) {
	code := m.Run()
	usedMu.Lock()
	defer usedMu.Unlock()
	for _, p := range usedPrefixes {
		if left, _ := existingNamespaces(p); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "testbed: leaked namespaces of %s: %v\n", p, left)
			code = 1
		}
	}
	os.Exit(code)
}

func withFailAfter(n int) Option { return func(o *options) { o.failAfter = n } }

func recordPrefix(p string) {
	usedMu.Lock()
	defer usedMu.Unlock()
	usedPrefixes = append(usedPrefixes, p)
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newTestbed builds spec and removes it when the test ends.
func newTestbed(t *testing.T, spec Spec, opts ...Option) *Testbed {
	t.Helper()
	privtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	opts = append([]Option{WithStateDir(t.TempDir()), WithLogger(testLogger(t))}, opts...)
	tb, err := New(ctx, spec, opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	recordPrefix(tb.Prefix())
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return tb
}

// serveName makes pod answer every connection on port with its name and
// the address it sees the client at.
func serveName(t *testing.T, p *Pod, port int) {
	t.Helper()
	l, err := p.Listen(context.Background(), "tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		t.Fatalf("listen in pod %s: %v", p.Name, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", p.Name, c.RemoteAddr())
			c.Close()
		}
	}()
}

// ask connects from pod to addr and returns the first line it answers.
func ask(from *Pod, addr netip.AddrPort) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestPodsReachEachOtherWithinAndAcrossNodes(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(2, 2, "default"))
	for _, p := range tb.Pods() {
		serveName(t, p, 7000)
	}
	for _, from := range tb.Pods() {
		for _, to := range tb.Pods() {
			if from == to {
				continue
			}
			got, err := ask(from, netip.AddrPortFrom(to.IP, 7000))
			if err != nil {
				t.Errorf("%s -> %s: %v", from.Name, to.Name, err)
				continue
			}
			// The server names itself and sees the client's pod IP.
			name, peer, _ := strings.Cut(got, " ")
			if ap, err := netip.ParseAddrPort(peer); name != to.Name || err != nil || ap.Addr() != from.IP {
				t.Errorf("%s -> %s: answer %q, want %q from %s", from.Name, to.Name, got, to.Name, from.IP)
			}
		}
	}
}

func TestNodeFindsPodVethByTheRouteToItsIP(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(2, 2, "default"))
	for _, n := range tb.Nodes() {
		h, err := netns.GetFromPath(n.NS)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		nl, err := netlink.NewHandleAt(h)
		if err != nil {
			t.Fatal(err)
		}
		defer nl.Close()
		for _, p := range n.Pods {
			routes, err := nl.RouteGet(p.IP.AsSlice())
			if err != nil || len(routes) == 0 {
				t.Fatalf("node %s: route to %s: %v", n.Name, p.IP, err)
			}
			l, err := nl.LinkByIndex(routes[0].LinkIndex)
			if err != nil || l.Attrs().Name != p.HostVeth || l.Type() != "veth" {
				t.Errorf("node %s: route to pod %s leaves by %v (err %v), want veth %s", n.Name, p.Name, l, err, p.HostVeth)
			}
		}
		// Other nodes' pods are reached over the uplink via their node.
		for _, other := range tb.Nodes() {
			if other == n {
				continue
			}
			routes, err := nl.RouteGet(other.Pods[0].IP.AsSlice())
			if err != nil || len(routes) == 0 || !routes[0].Gw.Equal(other.IP.AsSlice()) {
				t.Errorf("node %s: route to %s = %v (err %v), want via %s", n.Name, other.Pods[0].IP, routes, err, other.IP)
			}
		}
	}
}

// rootState describes the root namespace's links, addresses, routes and
// rules, one line each.
func rootState(t *testing.T) []string {
	t.Helper()
	var out []string
	links, err := netlink.LinkList()
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatal(err)
	}
	for _, l := range links {
		out = append(out, fmt.Sprintf("link %d %s %s", l.Attrs().Index, l.Attrs().Name, l.Type()))
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatal(err)
	}
	for _, a := range addrs {
		out = append(out, fmt.Sprintf("addr %d %s", a.LinkIndex, a.IPNet))
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: 0}, netlink.RT_FILTER_TABLE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatal(err)
	}
	for _, r := range routes {
		out = append(out, "route "+r.String())
	}
	rules, err := netlink.RuleList(netlink.FAMILY_ALL)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatal(err)
	}
	for _, r := range rules {
		out = append(out, "rule "+r.String())
	}
	slices.Sort(out)
	return out
}

func diff(a, b []string) (gone, added []string) {
	for _, s := range a {
		if !slices.Contains(b, s) {
			gone = append(gone, s)
		}
	}
	for _, s := range b {
		if !slices.Contains(a, s) {
			added = append(added, s)
		}
	}
	return gone, added
}

func TestRootNamespaceIsLeftAlone(t *testing.T) {
	privtest.Require(t)
	before := rootState(t)
	tb, err := New(context.Background(), SimpleSpec(2, 2, "default"), WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	recordPrefix(tb.Prefix())
	t.Cleanup(func() { tb.Close() })
	during := rootState(t)
	if err := tb.Close(); err != nil {
		t.Fatal(err)
	}
	after := rootState(t)
	for _, s := range []struct {
		when  string
		state []string
	}{{"while up", during}, {"after Close", after}} {
		if gone, added := diff(before, s.state); len(gone)+len(added) > 0 {
			t.Errorf("root namespace changed %s:\n removed %q\n added %q", s.when, gone, added)
		}
	}
}

func TestParallelTestbedsDoNotCollide(t *testing.T) {
	privtest.Require(t)
	spec := SimpleSpec(2, 1, "default")
	tbs := make([]*Testbed, 2)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range tbs {
		wg.Go(func() {
			tb, err := New(context.Background(), spec, WithStateDir(t.TempDir()))
			tbs[i], errs[i] = tb, err
			if err == nil {
				recordPrefix(tb.Prefix())
				t.Cleanup(func() { tb.Close() })
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if tbs[0].Prefix() == tbs[1].Prefix() {
		t.Fatalf("both testbeds got prefix %s", tbs[0].Prefix())
	}
	// Same names and addresses in both; each pod reaches its own twin.
	for i, tb := range tbs {
		srv := tb.Pod("pod-2-1")
		l, err := srv.Listen(context.Background(), "tcp", ":7000")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "testbed %d\n", i)
				c.Close()
			}
		}()
	}
	for i, tb := range tbs {
		got, err := ask(tb.Pod("pod-1-1"), netip.AddrPortFrom(tb.Pod("pod-2-1").IP, 7000))
		if want := fmt.Sprintf("testbed %d", i); err != nil || got != want {
			t.Errorf("in testbed %d (%s): answer %q, %v; want %q", i, tb.Prefix(), got, err, want)
		}
	}
	// Removing one leaves the other working.
	if err := tbs[0].Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(tbs[1].Pod("pod-1-1"), netip.AddrPortFrom(tbs[1].Pod("pod-2-1").IP, 7000)); err != nil || got != "testbed 1" {
		t.Errorf("after closing the other testbed: answer %q, %v", got, err)
	}
}

func TestFailedBuildLeavesNothingBehind(t *testing.T) {
	privtest.Require(t)
	spec := SimpleSpec(2, 2, "default")
	// The build has 1 + 2 + 4 namespace steps, a bridge step, 2 uplink
	// and 4 pod steps: fail at each in turn.
	const steps = 14
	for n := 1; n <= steps+1; n++ {
		dir := t.TempDir()
		tb, err := New(context.Background(), spec, WithStateDir(dir), withFailAfter(n), WithPrefix(fmt.Sprintf("tbfail%d", n)))
		recordPrefix(fmt.Sprintf("tbfail%d", n))
		if n > steps {
			if err != nil {
				t.Fatalf("build without injected failure: %v", err)
			}
			tb.Close()
			continue
		}
		if !errors.Is(err, errInjected) || tb != nil {
			t.Fatalf("failing at step %d: New = %v, %v; want the injected error", n, tb, err)
		}
		if left, _ := existingNamespaces(fmt.Sprintf("tbfail%d", n)); len(left) > 0 {
			t.Errorf("failing at step %d left namespaces %v", n, left)
		}
		if entries, _ := os.ReadDir(dir); len(entries) > 0 {
			t.Errorf("failing at step %d left state file %s", n, entries[0].Name())
		}
	}
}

func TestCancelledBuildLeavesNothingBehind(t *testing.T) {
	privtest.Require(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := New(ctx, SimpleSpec(1, 1, ""), WithStateDir(t.TempDir()), WithPrefix("tbcancel"))
	recordPrefix("tbcancel")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("New with a cancelled context = %v, want context.Canceled", err)
	}
	if left, _ := existingNamespaces("tbcancel"); len(left) > 0 {
		t.Errorf("left namespaces %v", left)
	}
}

func TestPrefixInUseIsRefused(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(1, 0, ""))
	_, err := New(context.Background(), SimpleSpec(1, 0, ""), WithStateDir(tb.stateDir), WithPrefix(tb.Prefix()))
	if err == nil || !strings.Contains(err.Error(), "is in use") {
		t.Fatalf("second New with prefix %s = %v, want 'in use'", tb.Prefix(), err)
	}
	// The refused build must not have torn down the first.
	if left, _ := existingNamespaces(tb.Prefix()); len(left) != 2 {
		t.Errorf("namespaces of the first testbed: %v, want 2", left)
	}
}

func TestCloseRemovesLinksEvenWhileAProcessHoldsTheNamespace(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(1, 1, ""))
	ctx, cancel := context.WithCancel(context.Background())
	holder := tb.Node("node1").Command(ctx, "sleep", "60")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = holder.Wait() })
	// Keep a handle on the node namespace to look inside after Close.
	h, err := netns.GetFromPath(tb.Node("node1").NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := tb.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tb.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if left, _ := existingNamespaces(tb.Prefix()); len(left) > 0 {
		t.Errorf("namespaces left: %v", left)
	}
	if _, err := os.Stat(tb.StateFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left: %v", err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	links, _ := nl.LinkList()
	for _, l := range links {
		if l.Attrs().Name != "lo" {
			t.Errorf("link %s left in the held node namespace", l.Attrs().Name)
		}
	}
}

func TestRemoveFromAnotherProcessUsesTheStateFile(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(2, 1, ""))
	infos, err := List(WithStateDir(tb.stateDir))
	if err != nil || len(infos) != 1 {
		t.Fatalf("List = %v, %v", infos, err)
	}
	if in := infos[0]; in.Prefix != tb.Prefix() || in.Nodes != 2 || in.Pods != 2 || in.Namespaces != 5 || in.PID != os.Getpid() {
		t.Errorf("List = %+v", in)
	}
	opened, err := Open(tb.Prefix(), WithStateDir(tb.stateDir))
	if err != nil {
		t.Fatal(err)
	}
	if opened.Pod("pod-2-1").IP != tb.Pod("pod-2-1").IP || opened.Pod("pod-2-1").NS != tb.Pod("pod-2-1").NS {
		t.Errorf("Open rebuilt another layout: %+v", opened.Pod("pod-2-1"))
	}
	// Remove works even when the state file is gone.
	if err := os.Remove(tb.StateFile()); err != nil {
		t.Fatal(err)
	}
	if err := Remove(tb.Prefix(), WithStateDir(tb.stateDir)); err != nil {
		t.Fatal(err)
	}
	if left, _ := existingNamespaces(tb.Prefix()); len(left) > 0 {
		t.Errorf("namespaces left: %v", left)
	}
}

func TestCaptureSeesPlaintextOnTheUnderlay(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(2, 2, "default"))
	marker := "mantlet-marker-" + tb.Prefix()
	server := tb.Pod("pod-2-1")
	l, err := server.Listen(context.Background(), "tcp", ":7000")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
	}()

	capture, err := tb.Capture(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	send := func(from *Pod, to netip.AddrPort, msg string) {
		t.Helper()
		c, err := from.Dial(context.Background(), "tcp", to.String())
		if err != nil {
			t.Fatal(err)
		}
		// Split the marker over two segments: reassembly must find it.
		half := len(msg) / 2
		if _, err := io.WriteString(c, msg[:half]); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		if _, err := io.WriteString(c, msg[half:]); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	send(tb.Pod("pod-1-1"), netip.AddrPortFrom(server.IP, 7000), marker)
	if s := <-got; s != marker {
		t.Fatalf("server received %q", s)
	}
	// Same-node traffic never reaches the underlay.
	l2, err := tb.Pod("pod-1-2").Listen(context.Background(), "tcp", ":7001")
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	go func() {
		if c, err := l2.Accept(); err == nil {
			_, _ = io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	send(tb.Pod("pod-1-1"), netip.AddrPortFrom(tb.Pod("pod-1-2").IP, 7001), "same-node-"+marker)

	pkts, err := capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if !Contains(pkts, []byte(marker)) {
		t.Fatalf("capture of %d packets does not contain the marker", len(pkts))
	}
	if Contains(pkts, []byte("same-node-")) {
		t.Error("capture shows same-node traffic on the underlay")
	}
	var syn, synack bool
	for _, p := range pkts {
		if p.Proto != ProtoTCP {
			t.Errorf("unexpected non-TCP packet on the underlay: %+v", p)
			continue
		}
		if p.Flags == SYN && p.Node == "node1" && p.Src.Addr() == tb.Pod("pod-1-1").IP && p.Dst == netip.AddrPortFrom(server.IP, 7000) {
			syn = true
		}
		if p.Flags == SYN|ACK && p.Node == "node2" && p.Src == netip.AddrPortFrom(server.IP, 7000) {
			synack = true
		}
	}
	if !syn || !synack {
		t.Errorf("handshake not seen with the right nodes and addresses (SYN %v, SYN|ACK %v) in %d packets", syn, synack, len(pkts))
	}
	if again, err := capture.Stop(); err != nil || len(again) != len(pkts) {
		t.Errorf("second Stop = %d packets, %v", len(again), err)
	}
}

func TestDoRunsInTheNamespaceAndComesBack(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(1, 1, ""))
	before, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	var addrs []net.Addr
	if err := tb.Pod("pod-1-1").Do(func() error {
		ifc, err := net.InterfaceByName(PodInterface)
		if err != nil {
			return err
		}
		addrs, err = ifc.Addrs()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || addrs[0].String() != tb.Pod("pod-1-1").IP.String()+"/32" {
		t.Errorf("pod eth0 addresses = %v", addrs)
	}
	wantErr := errors.New("from fn")
	if err := tb.Node("node1").Do(func() error { return wantErr }); !errors.Is(err, wantErr) {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	out, err := tb.Node("node1").Command(context.Background(), "cat", "/proc/sys/net/ipv4/ip_forward").Output()
	if err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Errorf("ip_forward in node = %q, %v; want 1", out, err)
	}
}

func TestCaptureShowsTLS13ButNeitherCertificateNorPayload(t *testing.T) {
	tb := newTestbed(t, SimpleSpec(2, 1, "default"))
	client, server := tb.Pod("pod-1-1"), tb.Pod("pod-2-1")
	marker := "tls-marker-" + tb.Prefix()
	l, err := server.Listen(context.Background(), "tcp", ":15008")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srvConf := &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(tls.Server(c, srvConf))
		got <- string(b)
	}()

	capture, err := tb.Capture(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := client.Dial(context.Background(), "tcp", netip.AddrPortFrom(server.IP, 15008).String())
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if _, err := io.WriteString(c, marker); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if s := <-got; s != marker {
		t.Fatalf("server received %q", s)
	}
	pkts, err := capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if Contains(pkts, []byte(marker)) {
		t.Error("the marker crossed the underlay in clear inside TLS")
	}
	var hellos []*TLSHello
	for _, s := range Streams(pkts) {
		if s.Src.Port() != 15008 && s.Dst.Port() != 15008 {
			t.Errorf("stream %s -> %s is not HBONE-shaped", s.Src, s.Dst)
		}
		h, err := ParseTLSHello(s.Data)
		if err != nil {
			t.Errorf("stream %s -> %s: %v", s.Src, s.Dst, err)
			continue
		}
		hellos = append(hellos, h)
	}
	if len(hellos) != 2 || hellos[0].Type != TLSClientHello || hellos[1].Type != TLSServerHello {
		t.Fatalf("hellos = %+v, want a client and a server hello", hellos)
	}
	if v := hellos[1].Version(); v != VersionTLS13 || hellos[1].PlaintextCertificate || hellos[0].ServerName != "" {
		t.Errorf("server hello version %#x, certificate in clear %v, client SNI %q; want TLS 1.3, no, none", v, hellos[1].PlaintextCertificate, hellos[0].ServerName)
	}
}
