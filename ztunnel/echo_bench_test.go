//go:build linux

package ztunnel_test

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkEcho makes 1-byte round trips on one connection through a
// ztunnel pair and through the TLS 1.3 forwarder pair: the app echoes each
// byte. It reports the round trip's median and 99th percentile and the
// process's CPU per round trip (client, both proxies and the app).
func BenchmarkEcho(b *testing.B) {
	b.Run("ztunnel-pair", func(b *testing.B) {
		m := newMesh(b, meshOpts{})
		c, err := m.dial(ipA1, m.appAddr(ipB1))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		runEcho(b, c)
	})
	b.Run("tls13-forwarder-pair", func(b *testing.B) {
		app := startApp(b, ipB1)
		fwd := newForwarderPair(b, netip.AddrPortFrom(ipB1, app.port))
		c := fwd.dial(b)
		defer c.Close()
		runEcho(b, c)
	})
}

func runEcho(b *testing.B, c *net.TCPConn) {
	one := []byte{'x'}
	in := make([]byte, 1)
	rt := func() {
		if _, err := c.Write(one); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, in); err != nil {
			b.Fatal(err)
		}
	}
	for range 100 { // warm up: the tunnel is open, its buffers pooled
		rt()
	}
	b.ReportAllocs()
	samples := make([]time.Duration, b.N)
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		rt()
		samples[i] = time.Since(t0)
	}
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/rt")
	slices.Sort(samples)
	pct := func(p float64) float64 {
		return float64(samples[min(len(samples)-1, int(p*float64(len(samples))))].Nanoseconds())
	}
	b.ReportMetric(pct(0.50), "p50-ns")
	b.ReportMetric(pct(0.99), "p99-ns")
}

// BenchmarkThroughputParallel is BenchmarkThroughput with 4 uploads at
// once from the same pod to the same pod (iperf3 -P 4): through a ztunnel
// pair they share the pool's key, whose streams spread over GOMAXPROCS
// connections as in the agent.
func BenchmarkThroughputParallel(b *testing.B) {
	const streams = 4
	b.Run("ztunnel-pair", func(b *testing.B) {
		var o meshOpts
		o.tuning.Tuning.SpreadConnsPerKey = runtime.GOMAXPROCS(0)
		m := newMesh(b, o)
		m.apps[ipB1].setHandler(sinkHandler)
		runParallelUpload(b, streams, func() (*net.TCPConn, error) { return m.dial(ipA1, m.appAddr(ipB1)) })
	})
	b.Run("tls13-forwarder-pair", func(b *testing.B) {
		sink := startApp(b, ipB1)
		sink.setHandler(sinkHandler)
		fwd := newForwarderPair(b, netip.AddrPortFrom(ipB1, sink.port))
		runParallelUpload(b, streams, fwd.tryDial)
	})
}

func runParallelUpload(b *testing.B, streams int, dial func() (*net.TCPConn, error)) {
	conns := make([]*net.TCPConn, streams)
	for i := range conns {
		c, err := dial()
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	b.SetBytes(chunk)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	var wg sync.WaitGroup
	errs := make([]error, streams)
	for i, c := range conns {
		n := int64(b.N / streams)
		if i < b.N%streams {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = tryUpload(c, n*chunk)
		}()
	}
	wg.Wait()
	b.StopTimer()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	gb := float64(b.N) * chunk / 1e9
	b.ReportMetric((cpuTime()-cpu0).Seconds()/gb, "cpu-s/GB")
}
