//go:build linux

package ztunnel_test

import (
	"fmt"
	"io"
	"net"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkConnMemory measures what open connections cost in memory:
// conns connections from one pod to one pod of the other node, each
// echoing one byte and then left idle, then each moving loadBytes each
// way at once, then closed. It runs once through the ztunnel pair and
// once straight from the client to the app ("direct"), in the same
// process, so that the difference is what the two ztunnels hold; docs/
// performance.md has the numbers.
//
// Metrics, per connection: heap-B/conn-idle and stack-B/conn-idle are the
// live heap (after GC) and goroutine stacks of the idle connections, over
// the state before they opened; B/conn-idle is their sum. heap-B/conn-load
// is the highest heap in use (live and not yet collected) seen while
// every connection moved its bytes, over the idle state. B/conn-closed is
// what heap and stacks still hold once the connections closed and their
// flows ended, over the state before they opened (leaks show here).
//
//	go test -run '^$' -bench BenchmarkConnMemory -benchtime 1x ./ztunnel/
func BenchmarkConnMemory(b *testing.B) {
	for _, conns := range []int{1000, 4000} {
		b.Run(fmt.Sprintf("ztunnel-pair/conns=%d", conns), func(b *testing.B) {
			m := newMesh(b, meshOpts{})
			app := m.apps[ipB1]
			app.setHandler(memApp)
			dst := m.appAddr(ipB1)
			dial := func() (*net.TCPConn, error) { return m.dial(ipA1, dst) }
			settled := func() bool {
				return m.nodes["node-a"].p.NumOpenFlows() == 0 && m.nodes["node-b"].p.NumOpenFlows() == 0
			}
			drain := func() {
				for _, n := range m.nodes {
					for len(n.flows) > 0 {
						<-n.flows
					}
				}
			}
			runConnMemory(b, conns, dial, settled, drain)
		})
		b.Run(fmt.Sprintf("direct/conns=%d", conns), func(b *testing.B) {
			app := startApp(b, ipB1)
			app.setHandler(memApp)
			dst := netip4(ipB1, app.port)
			dial := func() (*net.TCPConn, error) {
				c, err := bindDialer(ipA1).Dial("tcp4", dst)
				if err != nil {
					return nil, err
				}
				return c.(*net.TCPConn), nil
			}
			runConnMemory(b, conns, dial, func() bool { return true }, func() {})
		})
	}
}

func netip4(ip interface{ String() string }, port uint16) string {
	return fmt.Sprintf("%s:%d", ip, port)
}

// loadBytes is what each connection moves each way in the load phase.
const loadBytes = 256 << 10

// memApp answers the benchmark's clients: it echoes the first byte, then
// waits for a command byte: 'L' reads loadBytes and sends loadBytes back;
// EOF ends the connection. It holds no buffer while it waits.
func memApp(c *net.TCPConn) {
	var one [1]byte
	if _, err := io.ReadFull(c, one[:]); err != nil {
		return
	}
	if _, err := c.Write(one[:]); err != nil {
		return
	}
	for {
		if _, err := io.ReadFull(c, one[:]); err != nil {
			c.CloseWrite()
			return
		}
		if !memAppLoad(c) {
			return
		}
	}
}

// memAppLoad is memApp's load phase. Its buffer is on the heap (a 16 KiB
// array on the goroutine's stack would make every idle app goroutine
// hold a 32 KiB stack).
func memAppLoad(c *net.TCPConn) bool {
	buf := loadBuf()
	for n := 0; n < loadBytes; {
		k, err := c.Read(buf)
		if err != nil {
			return false
		}
		n += k
	}
	for n := 0; n < loadBytes; n += len(buf) {
		if _, err := c.Write(buf); err != nil {
			return false
		}
	}
	return true
}

var sink atomic.Pointer[[]byte]

// loadBuf returns a new 16 KiB buffer on the heap.
func loadBuf() []byte {
	b := make([]byte, 16<<10)
	sink.Store(&b) // escapes
	return b
}

var memGCs = 2

type memSample struct{ heap, stack, inuse, goroutines uint64 }

func readMem(gc bool) memSample {
	if gc {
		for range memGCs {
			runtime.GC()
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{heap: ms.HeapAlloc, stack: ms.StackInuse, inuse: ms.HeapInuse, goroutines: uint64(runtime.NumGoroutine())}
}

func runConnMemory(b *testing.B, conns int, dial func() (*net.TCPConn, error), settled func() bool, drain func()) {
	// Warm up: pools, one HBONE connection, code paths.
	for range 10 {
		c, err := dial()
		if err != nil {
			b.Fatal(err)
		}
		echoOne(b, c)
		c.Close()
	}
	waitSettled(b, settled)
	drain()
	debug.FreeOSMemory()
	b.ResetTimer()
	var idle, load, closed float64
	var heapIdle, stackIdle, gIdle float64
	for range b.N {
		before := readMem(true)
		cs := make([]*net.TCPConn, conns)
		var wg sync.WaitGroup
		var next atomic.Int64
		errs := make(chan error, 1)
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1)) - 1
					if i >= conns {
						return
					}
					c, err := dial()
					if err == nil {
						err = tryEchoOne(c)
					}
					if err != nil {
						select {
						case errs <- fmt.Errorf("connection %d: %w", i, err):
						default:
						}
						return
					}
					cs[i] = c
				}
			}()
		}
		wg.Wait()
		select {
		case err := <-errs:
			b.Fatal(err)
		default:
		}
		time.Sleep(100 * time.Millisecond)
		idleS := readMem(true)
		heapIdle += float64(int64(idleS.heap)-int64(before.heap)) / float64(conns)
		stackIdle += float64(int64(idleS.stack)-int64(before.stack)) / float64(conns)
		gIdle += float64(int64(idleS.goroutines)-int64(before.goroutines)) / float64(conns)
		idle += float64(int64(idleS.heap+idleS.stack)-int64(before.heap+before.stack)) / float64(conns)

		// Load: every connection moves loadBytes each way at once.
		var peak atomic.Uint64
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			t := time.NewTicker(5 * time.Millisecond)
			defer t.Stop()
			for {
				s := readMem(false)
				if s.inuse+s.stack > peak.Load() {
					peak.Store(s.inuse + s.stack)
				}
				select {
				case <-stop:
					return
				case <-t.C:
				}
			}
		}()
		for _, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := loadOne(c); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}()
		}
		wg.Wait()
		close(stop)
		<-sampled
		select {
		case err := <-errs:
			b.Fatal(err)
		default:
		}
		load += float64(int64(peak.Load())-int64(idleS.inuse+idleS.stack)) / float64(conns)

		for _, c := range cs {
			c.Close()
		}
		waitSettled(b, settled)
		drain()
		time.Sleep(100 * time.Millisecond)
		after := readMem(true)
		closed += float64(int64(after.heap+after.stack)-int64(before.heap+before.stack)) / float64(conns)
		debug.FreeOSMemory()
	}
	n := float64(b.N)
	b.ReportMetric(heapIdle/n, "heap-B/conn-idle")
	b.ReportMetric(stackIdle/n, "stack-B/conn-idle")
	b.ReportMetric(idle/n, "B/conn-idle")
	b.ReportMetric(gIdle/n, "goroutines/conn-idle")
	b.ReportMetric(load/n, "heap-B/conn-load")
	b.ReportMetric(closed/n, "B/conn-closed")
	ss := []metrics.Sample{{Name: "/gc/stack/starting-size:bytes"}}
	metrics.Read(ss)
	b.ReportMetric(float64(ss[0].Value.Uint64()), "stack-start-B")
}

func waitSettled(b *testing.B, settled func() bool) {
	deadline := time.Now().Add(30 * time.Second)
	for !settled() {
		if time.Now().After(deadline) {
			b.Fatal("flows did not end")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tryEchoOne(c *net.TCPConn) error {
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	var one [1]byte
	_, err := io.ReadFull(c, one[:])
	return err
}

func echoOne(b *testing.B, c *net.TCPConn) {
	if err := tryEchoOne(c); err != nil {
		b.Fatal(err)
	}
}

// loadOne sends 'L' and loadBytes, and reads loadBytes back.
func loadOne(c *net.TCPConn) error {
	buf := loadBuf()
	buf[0] = 'L'
	if _, err := c.Write(buf[:1]); err != nil {
		return err
	}
	for n := 0; n < loadBytes; n += len(buf) {
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	for n := 0; n < loadBytes; {
		k, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("after %d bytes back: %w", n, err)
		}
		n += k
	}
	return nil
}
