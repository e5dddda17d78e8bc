// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
)

// sourceHandler reads an 8-byte count, sends that many bytes and
// half-closes.
func sourceHandler(c *net.TCPConn) {
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	n := int64(binary.BigEndian.Uint64(hdr[:]))
	buf := make([]byte, 256<<10)
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := c.Write(buf[:k]); err != nil {
			return
		}
		n -= k
	}
	c.CloseWrite()
	io.Copy(io.Discard, c)
}

// BenchmarkDownload is BenchmarkThroughput the other way: the destination
// pod sends, so the bytes go through the destination ztunnel's HBONE
// server as Stream.Write (its frame writer) and through the client pool's
// response body.
func BenchmarkDownload(b *testing.B) {
	m := newMesh(b, meshOpts{})
	m.apps[ipB1].setHandler(sourceHandler)
	c, err := m.dial(ipA1, m.appAddr(ipB1))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	total := int64(b.N) * chunk
	b.SetBytes(chunk)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(total))
	if _, err := c.Write(hdr[:]); err != nil {
		b.Fatal(err)
	}
	c.CloseWrite()
	n, err := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
	if err != nil || n != total {
		b.Fatalf("received %d bytes (%v), want %d", n, err, total)
	}
	b.StopTimer()
	gb := float64(total) / 1e9
	b.ReportMetric((cpuTime()-cpu0).Seconds()/gb, "cpu-s/GB")
}
