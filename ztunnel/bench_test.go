// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/mantlet/mantlet/ztunnel/internal/ztest"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// cpuTime returns the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// sink is an app that counts what it receives and, at the client's EOF,
// answers with the count's low byte, so the client knows all arrived.
func sinkHandler(c *net.TCPConn) {
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, err := c.Read(buf)
		n += int64(k)
		if err != nil {
			break
		}
	}
	c.Write([]byte{byte(n)})
	c.CloseWrite()
}

// upload sends total bytes on c in 256 KiB writes and waits for the sink's
// acknowledgement.
func upload(b *testing.B, c *net.TCPConn, total int64) {
	if err := tryUpload(c, total); err != nil {
		b.Fatal(err)
	}
}

// tryUpload is upload for any goroutine.
func tryUpload(c *net.TCPConn, total int64) error {
	buf := make([]byte, 256<<10)
	for total > 0 {
		n := min(int64(len(buf)), total)
		if _, err := c.Write(buf[:n]); err != nil {
			return err
		}
		total -= n
	}
	c.CloseWrite()
	_, err := io.ReadAll(c)
	return err
}

const chunk = 1 << 20 // bytes per benchmark iteration

// BenchmarkThroughput sends one long upload through a ztunnel pair (HBONE
// over mutual TLS 1.3) and through a pair of plain Go TLS 1.3 forwarders,
// and reports throughput and the process's CPU seconds per GB (both ends
// of the tunnel, the client and the sink all run in this process).
func BenchmarkThroughput(b *testing.B) {
	b.Run("ztunnel-pair", func(b *testing.B) {
		m := newMesh(b, meshOpts{})
		m.apps[ipB1].setHandler(sinkHandler)
		c, err := m.dial(ipA1, m.appAddr(ipB1))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		runUpload(b, c)
	})
	b.Run("tls13-forwarder-pair", func(b *testing.B) {
		sink := startApp(b, ipB1)
		sink.setHandler(sinkHandler)
		fwd := newForwarderPair(b, netip.AddrPortFrom(ipB1, sink.port))
		c := fwd.dial(b)
		defer c.Close()
		runUpload(b, c)
	})
}

func runUpload(b *testing.B, c *net.TCPConn) {
	b.SetBytes(chunk)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	upload(b, c, int64(b.N)*chunk)
	b.StopTimer()
	gb := float64(b.N) * chunk / 1e9
	b.ReportMetric((cpuTime()-cpu0).Seconds()/gb, "cpu-s/GB")
}

// BenchmarkNewConnections opens short connections (1 byte each way): over
// a warm HBONE pool (one TLS handshake for all), and through the TLS 1.3
// forwarder pair, which makes a full handshake per connection.
func BenchmarkNewConnections(b *testing.B) {
	b.Run("ztunnel-warm-pool", func(b *testing.B) {
		m := newMesh(b, meshOpts{})
		dst := m.appAddr(ipB1)
		runConns(b, func() (*net.TCPConn, error) { return m.dial(ipA1, dst) })
		if h := m.nodes["node-a"].p.PoolStats().Handshakes; h > 2 {
			b.Fatalf("%d handshakes: the pool was not reused", h)
		}
	})
	b.Run("tls13-forwarder-fresh-handshakes", func(b *testing.B) {
		app := startApp(b, ipB1)
		fwd := newForwarderPair(b, netip.AddrPortFrom(ipB1, app.port))
		runConns(b, func() (*net.TCPConn, error) { return fwd.tryDial() })
	})
}

func runConns(b *testing.B, dial func() (*net.TCPConn, error)) {
	b.ReportAllocs()
	one := []byte{'x'}
	cpu0 := cpuTime()
	start := time.Now()
	b.ResetTimer()
	for range b.N {
		c, err := dial()
		if err != nil {
			b.Fatal(err)
		}
		c.Write(one)
		c.CloseWrite()
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "conns/s")
	b.ReportMetric((cpuTime()-cpu0).Seconds()*1e6/float64(b.N), "cpu-µs/conn")
}

// forwarderPair is the baseline: a plaintext listener that forwards each
// connection over its own TLS 1.3 connection (ECDSA P-256 certificates
// from the same CA, mutual authentication) to a TLS listener that
// forwards to the destination. No HTTP/2, no pooling.
type forwarderPair struct {
	in  net.Listener
	wg  sync.WaitGroup
	dst netip.AddrPort
}

func newForwarderPair(b *testing.B, dst netip.AddrPort) *forwarderPair {
	tb := b
	c := ztest.NewCA(tb, "cluster.local", ca.Options{})
	srvSVID := must(c.SVID(context.Background(), c.ID("shop", "checkout")))
	cliSVID := must(c.SVID(context.Background(), c.ID("shop", "frontend")))
	srvCfg := hbone.ServerConfig(func(context.Context, netip.Addr) (*x509svid.SVID, error) { return srvSVID, nil }, c.Bundles())
	srvCfg.NextProtos = nil
	cliCfg := hbone.ClientConfig(cliSVID, c.Bundles(), srvSVID.ID)
	cliCfg.NextProtos = nil
	f := &forwarderPair{dst: dst}
	outer, err := tls.Listen("tcp4", "127.0.0.1:0", srvCfg)
	if err != nil {
		b.Fatal(err)
	}
	f.in, err = net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	serve := func(ln net.Listener, dial func() (net.Conn, error)) {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				up, err := dial()
				if err != nil {
					return
				}
				defer up.Close()
				pipe(c, up)
			}()
		}
	}
	f.wg.Add(2)
	go serve(outer, func() (net.Conn, error) { return net.Dial("tcp4", dst.String()) })
	go serve(f.in, func() (net.Conn, error) { return tls.Dial("tcp4", outer.Addr().String(), cliCfg) })
	b.Cleanup(func() {
		f.in.Close()
		outer.Close()
		f.wg.Wait()
	})
	return f
}

func (f *forwarderPair) tryDial() (*net.TCPConn, error) {
	c, err := net.Dial("tcp4", f.in.Addr().String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (f *forwarderPair) dial(b *testing.B) *net.TCPConn {
	c, err := f.tryDial()
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// pipe copies both ways with half-close, 64 KiB buffers.
func pipe(a, b net.Conn) {
	done := make(chan struct{})
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 64<<10)
		io.CopyBuffer(writerOnlyT{dst}, readerOnly{src}, buf)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	go func() { cp(b, a); close(done) }()
	cp(a, b)
	<-done
}

type writerOnlyT struct{ io.Writer }

// BenchmarkTuning is the sweep behind hbone.DefaultTuning: the upload of
// BenchmarkThroughput under a few window and frame sizes.
func BenchmarkTuning(b *testing.B) {
	for _, tu := range []hbone.Tuning{
		{StreamWindow: 1 << 20, ConnWindow: 4 << 20, MaxFrameSize: 16 << 10},
		{StreamWindow: 1 << 20, ConnWindow: 4 << 20, MaxFrameSize: 1 << 20},
		{StreamWindow: 4 << 20, ConnWindow: 16 << 20, MaxFrameSize: 16 << 10},
		{StreamWindow: 4 << 20, ConnWindow: 16 << 20, MaxFrameSize: 1 << 20},
		{StreamWindow: 16 << 20, ConnWindow: 64 << 20, MaxFrameSize: 1 << 20},
	} {
		name := fmt.Sprintf("stream=%dKiB/conn=%dKiB/frame=%dKiB", tu.StreamWindow>>10, tu.ConnWindow>>10, tu.MaxFrameSize>>10)
		b.Run(name, func(b *testing.B) {
			var o meshOpts
			o.tuning.Tuning = tu
			m := newMesh(b, o)
			m.apps[ipB1].setHandler(sinkHandler)
			c, err := m.dial(ipA1, m.appAddr(ipB1))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			runUpload(b, c)
		})
	}
}
