package rawtcp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listen returns a loopback listener closed at the end of the test.
func listen(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// rawListen returns a loopback Listener closed at the end of the test.
func rawListen(t testing.TB) *Listener {
	t.Helper()
	ln, err := Listen(listen(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// pair returns a dialled and an accepted Conn, connected to each other and
// closed at the end of the test.
func pair(t testing.TB, ln *Listener) (client, server *Conn) {
	t.Helper()
	type result struct {
		c   *Conn
		err error
	}
	accepted := make(chan result, 1)
	go func() {
		c, err := ln.AcceptConn()
		accepted <- result{c, err}
	}()
	client, err := Dial(context.Background(), ln.Addr().(*net.TCPAddr).AddrPort(), netip.Addr{}, 0)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	r := <-accepted
	if r.err != nil {
		t.Fatalf("accept: %v", r.err)
	}
	t.Cleanup(func() { client.Close(); r.c.Close() })
	return client, r.c
}

func TestEchoBothDirectionsThenEOFAfterCloseWrite(t *testing.T) {
	ln := rawListen(t)
	client, server := pair(t, ln)

	if got, want := client.RemoteAddr().String(), ln.Addr().String(); got != want {
		t.Errorf("client RemoteAddr = %s, want %s", got, want)
	}
	if got, want := server.LocalAddr().String(), ln.Addr().String(); got != want {
		t.Errorf("server LocalAddr = %s, want %s", got, want)
	}
	if got, want := server.RemoteAddr().String(), client.LocalAddr().String(); got != want {
		t.Errorf("server RemoteAddr = %s, want client LocalAddr %s", got, want)
	}

	// More than a socket buffer, so that Write has to wait for the reader.
	msg := bytes.Repeat([]byte("mantlet "), 1<<18)
	for _, dir := range []struct {
		name     string
		from, to *Conn
	}{{"client to server", client, server}, {"server to client", server, client}} {
		errc := make(chan error, 1)
		go func() {
			_, err := dir.from.Write(msg)
			errc <- err
		}()
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(dir.to, got); err != nil {
			t.Fatalf("%s: read: %v", dir.name, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%s: write: %v", dir.name, err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("%s: data differs", dir.name)
		}
	}

	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := server.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("server Read after client CloseWrite = %d, %v; want 0, io.EOF", n, err)
	}
	// The other direction still works.
	if _, err := server.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "bye" {
		t.Fatalf("client read %q, %v", got, err)
	}
}

func TestCloseAfterSetLingerZeroResetsPeer(t *testing.T) {
	client, server := pair(t, rawListen(t))
	if err := server.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := client.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("peer Read after close with linger 0 = %v, want ECONNRESET", err)
	}
}

func TestOperationsAfterCloseSayClosed(t *testing.T) {
	client, _ := pair(t, rawListen(t))
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	rc, _ := client.SyscallConn()
	for name, err := range map[string]error{
		"Close":       client.Close(),
		"Read":        second(client.Read(make([]byte, 1))),
		"TryRead":     second(client.TryRead(make([]byte, 1))),
		"Write":       second(client.Write([]byte("x"))),
		"CloseWrite":  client.CloseWrite(),
		"SetLinger":   client.SetLinger(0),
		"SetDeadline": client.SetDeadline(time.Now()),
		"Control":     rc.Control(func(uintptr) {}),
		"RawRead":     rc.Read(func(uintptr) bool { return true }),
	} {
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after Close = %v, want net.ErrClosed", name, err)
		}
	}
	if client.WaitRead(func() { t.Error("WaitRead kept its func after Close") }) {
		t.Error("WaitRead after Close = true, want false")
	}
}

func second[T any](_ T, err error) error { return err }

func TestDeadlines(t *testing.T) {
	client, server := pair(t, rawListen(t))

	// A deadline in the past fails Read at once, even with data waiting.
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := server.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	_, err := server.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read with past deadline = %v, want a timeout", err)
	}
	// Clearing it makes Read work again.
	if err := server.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if n, err := server.Read(make([]byte, 1)); n != 1 || err != nil {
		t.Fatalf("Read after clearing the deadline = %d, %v", n, err)
	}

	// A future deadline ends a blocked Read.
	if err := server.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("blocked Read past its deadline = %v, want a timeout", err)
	}

	// A deadline set while Read is blocked ends it.
	if err := server.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := server.Read(make([]byte, 1)); errc <- err }()
	time.Sleep(10 * time.Millisecond) // usually blocked by now; either way the deadline ends it
	if err := server.SetReadDeadline(time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read blocked when its deadline was set in the past = %v, want a timeout", err)
	}

	// A write deadline ends a Write blocked on a full buffer.
	if err := client.SetWriteDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	// (On a loaded machine the deadline may pass before the first byte.)
	n, err := client.Write(make([]byte, 64<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) || n == 64<<20 {
		t.Fatalf("Write into a full buffer past its deadline = %d, %v; want a timeout", n, err)
	}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) netip.AddrPort {
	ln := listen(t)
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

// openFDs counts the process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestDialErrorsAreNetDialers(t *testing.T) {
	before := openFDs(t)
	_, err := Dial(context.Background(), closedPort(t), netip.Addr{}, 0)
	var oe *net.OpError
	if !errors.Is(err, syscall.ECONNREFUSED) || !errors.As(err, &oe) || oe.Op != "dial" {
		t.Errorf("Dial to a closed port = %v, want a dial *net.OpError with ECONNREFUSED", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Dial(ctx, closedPort(t), netip.Addr{}, 0); !errors.Is(err, context.Canceled) {
		t.Errorf("Dial with a cancelled context = %v, want context.Canceled", err)
	}

	if _, err := Dial(context.Background(), netip.MustParseAddrPort("[::1]:1"), netip.MustParseAddr("127.0.0.1"), 0); err == nil {
		t.Errorf("Dial from an IPv4 source to an IPv6 destination succeeded")
	}
	if after := openFDs(t); after != before {
		t.Errorf("open fds %d before failing dials, %d after", before, after)
	}
}

// TestDialEndsWithContext dials a listener whose accept queue is full: the
// kernel drops the SYNs, so only the context's deadline ends the dial.
func TestDialEndsWithContext(t *testing.T) {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(lfd) })
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(lfd, 0); err != nil { // room for one connection
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		t.Fatal(err)
	}
	sa4 := sa.(*unix.SockaddrInet4)
	dst := netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), uint16(sa4.Port))

	before := openFDs(t)
	var conns []*Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range 4 {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		c, err := Dial(ctx, dst, netip.Addr{}, 0)
		cancel()
		if err == nil {
			conns = append(conns, c)
			continue
		}
		var ne net.Error
		if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("dial %d to a full listener = %v, want context.DeadlineExceeded", i, err)
		}
		if after := openFDs(t); after != before+len(conns) {
			t.Errorf("open fds: %d before, %d after (%d connected): the failed dial leaked its socket", before, after, len(conns))
		}
		return
	}
	t.Fatalf("4 dials to a listener with backlog 0 all connected")
}

func TestDialSetsMarkAndTransparentSource(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (SO_MARK, IP_TRANSPARENT), and CI runs as root")
		}
		t.Skip("needs root (SO_MARK, IP_TRANSPARENT)")
	}
	ln := rawListen(t)
	go func() {
		c, err := ln.AcceptConn()
		if err == nil {
			c.Close()
		}
	}()
	// 127.0.0.2 is local (all of 127/8 is), but the bind only succeeds
	// with IP_TRANSPARENT for non-local addresses: this checks the option
	// path, the address, and the mark.
	src := netip.MustParseAddr("127.0.0.2")
	c, err := Dial(context.Background(), ln.Addr().(*net.TCPAddr).AddrPort(), src, 0x539)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.LocalAddrPort().Addr(); got != src {
		t.Errorf("local address %s, want %s", got, src)
	}
	rc, _ := c.SyscallConn()
	var mark int
	var merr error
	rc.Control(func(fd uintptr) { mark, merr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
	if merr != nil || mark != 0x539 {
		t.Errorf("SO_MARK = %#x, %v; want 0x539", mark, merr)
	}
	var keepAlive, idle int
	rc.Control(func(fd uintptr) {
		keepAlive, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
	})
	if keepAlive != 1 || idle != 15 {
		t.Errorf("SO_KEEPALIVE %d, TCP_KEEPIDLE %d; want 1, 15 (net.Dialer's defaults)", keepAlive, idle)
	}
}

func TestAcceptAfterListenerCloseSaysClosed(t *testing.T) {
	ln := rawListen(t)
	errc := make(chan error, 1)
	go func() { _, err := ln.Accept(); errc <- err }()
	time.Sleep(10 * time.Millisecond) // usually blocked in Accept by now; either way it must fail
	ln.Close()
	if err := <-errc; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on a closed listener = %v, want net.ErrClosed", err)
	}
}

func TestWaitReadCallsFuncOnceWhenDataArrives(t *testing.T) {
	client, server := pair(t, rawListen(t))
	drain(t, server)

	var calls atomic.Int32
	called := make(chan struct{}, 10)
	if !server.WaitRead(func() { calls.Add(1); called <- struct{}{} }) {
		t.Fatal("WaitRead on an idle socket = false, want true")
	}
	if _, err := client.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	<-called
	if n, err := server.TryRead(make([]byte, 10)); n != 1 || err != nil {
		t.Fatalf("TryRead after the callback = %d, %v; want 1 byte", n, err)
	}
	// More data and a second round: the first func is not called again.
	second := make(chan struct{})
	if server.WaitRead(func() { close(second) }) {
		if _, err := client.Write([]byte("b")); err != nil {
			t.Fatal(err)
		}
		<-second
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("first callback called %d times, want 1", n)
	}
}

// drain reads until the socket would block and no readiness is pending.
func drain(t *testing.T, c *Conn) {
	t.Helper()
	for {
		_, err := c.TryRead(make([]byte, 1024))
		if err == ErrWouldBlock {
			c.mu.Lock()
			pending := c.r.ready
			c.r.ready = false
			c.mu.Unlock()
			if !pending {
				return
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestWaitReadReturnsFalseWhenDataArrivedAlready(t *testing.T) {
	client, server := pair(t, rawListen(t))
	drain(t, server)
	if _, err := client.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	// Wait for the poller to have seen it.
	for deadline := time.Now().Add(10 * time.Second); ; {
		server.mu.Lock()
		ready := server.r.ready
		server.mu.Unlock()
		if ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the poller did not report data written 10 s ago")
		}
		time.Sleep(time.Millisecond)
	}
	if server.WaitRead(func() { t.Error("WaitRead kept its func although data had arrived") }) {
		t.Fatal("WaitRead with data waiting = true, want false")
	}
	if n, err := server.TryRead(make([]byte, 10)); n != 1 || err != nil {
		t.Fatalf("TryRead = %d, %v; want 1 byte", n, err)
	}
}

func TestWaitReadIsCalledOnClose(t *testing.T) {
	_, server := pair(t, rawListen(t))
	drain(t, server)
	var calls atomic.Int32
	if !server.WaitRead(func() { calls.Add(1) }) {
		t.Fatal("WaitRead on an idle socket = false, want true")
	}
	server.Close()
	if n := calls.Load(); n != 1 {
		t.Fatalf("callback called %d times by Close, want 1", n)
	}
	server.Close()
	if n := calls.Load(); n != 1 {
		t.Fatalf("callback called %d times after a second Close, want 1", n)
	}
}

func TestWaitReadTwicePanics(t *testing.T) {
	_, server := pair(t, rawListen(t))
	drain(t, server)
	if !server.WaitRead(func() {}) {
		t.Fatal("WaitRead on an idle socket = false, want true")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a second pending WaitRead did not panic")
		}
	}()
	server.WaitRead(func() {})
}

// TestWaitReadLosesNoWakeUp runs a goroutine-free echo server (TryRead
// until ErrWouldBlock, then WaitRead) against a client that sends the next
// byte as soon as the previous one came back, so writes race the server's
// way from EAGAIN to WaitRead. A lost wake-up stalls the exchange.
func TestWaitReadLosesNoWakeUp(t *testing.T) {
	const rounds = 2000
	client, server := pair(t, rawListen(t))

	done := make(chan error, 1)
	var serve func()
	buf := make([]byte, 16)
	serve = func() {
		for {
			n, err := server.TryRead(buf)
			if err == ErrWouldBlock {
				if server.WaitRead(func() { go serve() }) {
					return
				}
				continue
			}
			if err == io.EOF {
				done <- nil
				return
			}
			if err != nil {
				done <- err
				return
			}
			if _, err := server.Write(buf[:n]); err != nil {
				done <- err
				return
			}
		}
	}
	go serve()

	stall := time.AfterFunc(60*time.Second, func() { client.Close() })
	defer stall.Stop()
	b := make([]byte, 1)
	for i := range rounds {
		if _, err := client.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("round %d: write: %v", i, err)
		}
		if _, err := io.ReadFull(client, b); err != nil {
			t.Fatalf("round %d: no echo (a lost wake-up stalls the server): %v", i, err)
		}
		if b[0] != byte(i) {
			t.Fatalf("round %d: echo %d", i, b[0])
		}
	}
	client.CloseWrite()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentCloseIsSafe closes Conns while Reads, Writes, raw reads and
// WaitReads are in flight, and while other goroutines open sockets that may
// get the closed fd numbers: nothing may panic or race, every operation
// returns, and no byte reaches a socket that reused a closed fd number.
func TestConcurrentCloseIsSafe(t *testing.T) {
	ln := rawListen(t)
	stop := make(chan struct{})
	var reusers sync.WaitGroup
	var leaked atomic.Int64
	for range 2 {
		reusers.Add(1)
		go func() {
			defer reusers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					continue
				}
				time.Sleep(50 * time.Microsecond)
				for _, fd := range fds {
					if n, _ := unix.Read(fd, make([]byte, 64)); n > 0 {
						leaked.Add(int64(n))
					}
					unix.Close(fd)
				}
			}
		}()
	}
	defer func() { close(stop); reusers.Wait() }()

	for range 200 {
		client, server := pair(t, ln)
		var wg sync.WaitGroup
		wg.Add(5)
		go func() { defer wg.Done(); server.Read(make([]byte, 64)) }()
		go func() {
			defer wg.Done()
			for {
				if _, err := client.Write(make([]byte, 4096)); err != nil {
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			rc, _ := client.SyscallConn()
			rc.Read(func(fd uintptr) bool {
				_, err := unix.Read(int(fd), make([]byte, 64))
				return err != unix.EAGAIN
			})
		}()
		go func() {
			defer wg.Done()
			called := make(chan struct{})
			if client.WaitRead(func() { close(called) }) {
				<-called
			}
		}()
		go func() { defer wg.Done(); client.Close(); server.Close() }()
		wg.Wait()
	}
	if n := leaked.Load(); n != 0 {
		t.Fatalf("%d bytes reached sockets that reused closed fd numbers", n)
	}
}

func TestSlotTableShrinks(t *testing.T) {
	ln := rawListen(t)
	p, err := getPoller()
	if err != nil {
		t.Fatal(err)
	}
	_, before := p.stats()
	var conns []*Conn
	for range 1500 {
		c, s := pair(t, ln)
		conns = append(conns, c, s)
	}
	if slots, _ := p.stats(); slots < 3000 {
		t.Fatalf("slot table has %d slots with 3000 Conns open", slots)
	}
	// Close all but a few, keeping some from the top of the table, which
	// have to move down; they must still work afterwards.
	keep := []*Conn{conns[len(conns)-2], conns[len(conns)-1], conns[0], conns[1]}
	for _, c := range conns[2 : len(conns)-2] {
		c.Close()
	}
	slots, inUse := p.stats()
	if slots > minSlots || inUse != before+4 {
		t.Fatalf("after closing: %d slots, %d in use; want <= %d slots, %d in use", slots, inUse, minSlots, before+4)
	}
	for i := 0; i < len(keep); i += 2 {
		a, b := keep[i], keep[i+1]
		drain(t, b)
		called := make(chan struct{})
		if b.WaitRead(func() { close(called) }) {
			if _, err := a.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			<-called
		}
		if _, err := io.ReadFull(b, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAddressesOfBothFamilies dials IPv4 and IPv6 loopback listeners: both
// ends report the addresses the other sees, and a byte goes each way.
func TestAddressesOfBothFamilies(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip)})
			if err != nil {
				t.Fatal(err)
			}
			rl, err := Listen(ln)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { rl.Close() })
			client, server := pair(t, rl)
			for _, c := range []struct {
				name      string
				got, want net.Addr
			}{
				{"client RemoteAddr", client.RemoteAddr(), rl.Addr()},
				{"server LocalAddr", server.LocalAddr(), rl.Addr()},
				{"server RemoteAddr", server.RemoteAddr(), client.LocalAddr()},
			} {
				if c.got.String() != c.want.String() {
					t.Errorf("%s = %s, want %s", c.name, c.got, c.want)
				}
			}
			if client.LocalAddrPort().Addr() != netip.MustParseAddr(ip) || client.LocalAddrPort().Port() == 0 {
				t.Errorf("client LocalAddr = %s, want %s and a port", client.LocalAddr(), ip)
			}
			b := make([]byte, 1)
			for _, dir := range [][2]*Conn{{client, server}, {server, client}} {
				if _, err := dir[0].Write([]byte{'x'}); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(dir[1], b); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestBlockedWritesAndReadsLoseNoWakeUp echoes blocks larger than a
// socket buffer through several socket pairs at once, so that writers and
// readers at both ends block thousands of times, sharing wait channels
// (waitChans): a lost wake-up stalls a pair. Afterwards no Conn holds a
// wait channel.
func TestBlockedWritesAndReadsLoseNoWakeUp(t *testing.T) {
	const (
		pairs  = 4
		rounds = 400
		block  = 256 << 10
	)
	ln := rawListen(t)
	var wg sync.WaitGroup
	var conns []*Conn
	errc := make(chan error, 2*pairs)
	for range pairs {
		client, server := pair(t, ln)
		conns = append(conns, client, server)
		wg.Add(2)
		go func() { // echo server
			defer wg.Done()
			buf := make([]byte, block)
			for {
				if _, err := io.ReadFull(server, buf); err != nil {
					if err == io.EOF {
						err = nil
					}
					errc <- err
					return
				}
				if _, err := server.Write(buf); err != nil {
					errc <- err
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			out, in := bytes.Repeat([]byte{1}, block), make([]byte, block)
			for i := range rounds {
				out[0] = byte(i)
				if _, err := client.Write(out); err != nil {
					errc <- err
					return
				}
				if _, err := io.ReadFull(client, in); err != nil {
					errc <- err
					return
				}
				if in[0] != byte(i) {
					errc <- fmt.Errorf("round %d: echo of round %d", i, in[0])
					return
				}
			}
			errc <- client.CloseWrite()
		}()
	}
	stall := time.AfterFunc(60*time.Second, func() {
		for _, c := range conns {
			c.Close()
		}
	})
	wg.Wait()
	if !stall.Stop() {
		t.Fatal("an echo stalled for 60 s (a lost wake-up)")
	}
	for range 2 * pairs {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range conns {
		c.mu.Lock()
		held := c.r.ch != nil || c.w.ch != nil
		c.mu.Unlock()
		if held {
			t.Errorf("Conn %d holds a wait channel after its waits ended", i)
		}
	}
}

// TestCloseWithLingerDeliversData closes a Conn with SO_LINGER set to a
// positive time (the ordinary close, see closeFD) right after writing:
// the peer reads all of it, then EOF.
func TestCloseWithLingerDeliversData(t *testing.T) {
	client, server := pair(t, rawListen(t))
	if err := server.SetLinger(5); err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("linger "), 1<<14)
	if _, err := server.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("peer read %d bytes, %v; want %d bytes, EOF", len(got), err, len(msg))
	}
}

// TestListenTakesOverTheSocket listens with Go (IP_TRANSPARENT and SO_MARK
// when root, as the agent's listeners have them), hands the listener to
// Listen, and connects: Go's listener is closed, the connection is
// accepted by the Listener with the addresses of both ends, the options
// of Dial's sockets, and what it inherits from the listening socket.
func TestListenTakesOverTheSocket(t *testing.T) {
	root := os.Geteuid() == 0
	if !root && os.Getenv("CI") == "true" {
		t.Fatal("needs root (SO_MARK, IP_TRANSPARENT), and CI runs as root")
	}
	const mark = 0x5a
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		if !root {
			return nil
		}
		var err error
		rc.Control(func(fd uintptr) {
			if err = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); err == nil {
				err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
			}
		})
		return err
	}}
	gln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gln.Close() })
	ln, err := Listen(gln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if _, err := gln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Go's listener after Listen: Accept = %v, want net.ErrClosed", err)
	}
	if ln.Addr().String() != gln.Addr().String() {
		t.Errorf("Addr = %s, want Go's listener's %s", ln.Addr(), gln.Addr())
	}
	client, server := pair(t, ln)
	if server.LocalAddr().String() != ln.Addr().String() || server.RemoteAddr().String() != client.LocalAddr().String() {
		t.Errorf("accepted: local %s, remote %s; want %s, %s", server.LocalAddr(), server.RemoteAddr(), ln.Addr(), client.LocalAddr())
	}
	opts := map[string]struct{ level, opt, want int }{
		"TCP_NODELAY":  {unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		"SO_KEEPALIVE": {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		"TCP_KEEPIDLE": {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		"TCP_KEEPCNT":  {unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
	}
	if root {
		opts["SO_MARK"] = struct{ level, opt, want int }{unix.SOL_SOCKET, unix.SO_MARK, mark}
		opts["IP_TRANSPARENT"] = struct{ level, opt, want int }{unix.SOL_IP, unix.IP_TRANSPARENT, 1}
	}
	rc, _ := server.SyscallConn()
	rc.Control(func(fd uintptr) {
		for name, o := range opts {
			if v, err := unix.GetsockoptInt(int(fd), o.level, o.opt); err != nil || v != o.want {
				t.Errorf("accepted socket's %s = %d, %v; want %d", name, v, err, o.want)
			}
		}
	})
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
}

func TestListenerCloseTwiceSaysClosed(t *testing.T) {
	ln := rawListen(t)
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ln.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close = %v, want net.ErrClosed", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
	}
}

// TestAcceptHonoursDeadline: an Accept waiting when the deadline passes
// fails with a timeout; cleared, the next Accept takes the connection.
func TestAcceptHonoursDeadline(t *testing.T) {
	ln := rawListen(t)
	if err := ln.SetDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, err := ln.Accept()
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Accept past the deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	if err := ln.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	pair(t, ln)
}

// TestAcceptOutOfDescriptorsKeepsTheConnection makes accept4 fail with
// EMFILE: Accept returns it as Go's listeners do, and once a descriptor is
// free again the next Accept takes the connection that waited.
func TestAcceptOutOfDescriptorsKeepsTheConnection(t *testing.T) {
	ln := rawListen(t)
	client, err := Dial(context.Background(), ln.Addr().(*net.TCPAddr).AddrPort(), netip.Addr{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })

	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// Take every free descriptor below a limit just above those open.
	fill := []int{}
	release := func() {
		for _, fd := range fill {
			unix.Close(fd)
		}
		fill = nil
		unix.Setrlimit(unix.RLIMIT_NOFILE, &lim)
	}
	defer release()
	low := lim
	low.Cur = uint64(openFDs(t) + 64)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	for {
		fd, err := unix.Dup(0)
		if err == unix.EMFILE {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		fill = append(fill, fd)
	}
	_, err = ln.Accept()
	release()
	var oe *net.OpError
	if !errors.Is(err, syscall.EMFILE) || !errors.As(err, &oe) || oe.Op != "accept" {
		t.Fatalf("Accept without a free descriptor = %v, want a *net.OpError accept with EMFILE", err)
	}
	server, err := ln.AcceptConn()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	if server.RemoteAddr().String() != client.LocalAddr().String() {
		t.Errorf("accepted %s, want the connection that waited, from %s", server.RemoteAddr(), client.LocalAddr())
	}
}
