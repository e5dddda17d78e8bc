package ztunnel

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(b *testing.B) (*net.TCPConn, *net.TCPConn) {
	b.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// BenchmarkCopyTCP compares what the same-node path pays per byte between
// two TCP sockets: the counted copy through a pooled buffer (what splice
// does, so that open flows show their bytes) and the kernel's splice
// (net.TCPConn.ReadFrom, which counts nothing until it returns).
func BenchmarkCopyTCP(b *testing.B) {
	const chunk = 1 << 20
	for _, bc := range []struct {
		name string
		copy func(dst, src *net.TCPConn, n *atomic.Int64) (int64, error)
	}{
		{"counted-buffer", func(dst, src *net.TCPConn, n *atomic.Int64) (int64, error) {
			w, _, err := copyCounted(dst, src, n)
			return w, err
		}},
		{"kernel-splice", func(dst, src *net.TCPConn, _ *atomic.Int64) (int64, error) { return dst.ReadFrom(src) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			// writer -> in ... copy ... out -> reader
			writer, in := tcpPair(b)
			out, reader := tcpPair(b)
			var n atomic.Int64
			done := make(chan error, 1)
			go func() {
				_, err := bc.copy(out, in, &n)
				out.CloseWrite()
				done <- err
			}()
			drained := make(chan int64, 1)
			go func() {
				m, _ := io.Copy(io.Discard, reader)
				drained <- m
			}()
			buf := make([]byte, chunk)
			b.SetBytes(chunk)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := writer.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			writer.CloseWrite()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			if got := <-drained; got != int64(b.N)*chunk {
				b.Fatalf("%d bytes arrived, want %d", got, int64(b.N)*chunk)
			}
		})
	}
}
