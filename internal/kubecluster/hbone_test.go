package kubecluster

import (
	"crypto/tls"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/testbed"
)

// clientHello returns the first flight of a TLS client with maxVersion.
func clientHello(t *testing.T, maxVersion uint16) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		_ = tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, MaxVersion: maxVersion}).Handshake()
		c.Close()
	}()
	buf := make([]byte, 4096)
	n, err := s.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

// TestHBONECheckTellsHBONEFromAnythingElse: the underlay check accepts a
// flow on a connection it saw open with TLS 1.3 (also when a later capture
// sees only the rest of it), and nothing else between the two pods.
func TestHBONECheckTellsHBONEFromAnythingElse(t *testing.T) {
	client, server := netip.MustParseAddr("198.19.1.11"), netip.MustParseAddr("198.19.2.11")
	hello13, hello12 := clientHello(t, tls.VersionTLS13), clientHello(t, tls.VersionTLS12)
	seg := func(sport, dport uint16, flags testbed.TCPFlags, payload []byte) testbed.Packet {
		src, dst := netip.AddrPortFrom(client, sport), netip.AddrPortFrom(server, dport)
		if sport == 15008 {
			src, dst = netip.AddrPortFrom(server, sport), netip.AddrPortFrom(client, dport)
		}
		return testbed.Packet{Proto: testbed.ProtoTCP, Src: src, Dst: dst, Seq: 1000, Flags: flags, Payload: payload}
	}
	record := []byte{0x17, 0x03, 0x03, 0x00, 0x02, 0xaa, 0xbb} // application data, as a pooled connection carries it
	seen := HBONEConns{}
	steps := []struct {
		name    string
		pkts    []testbed.Packet
		wantN   int
		wantErr string
	}{
		{"a new connection opened with TLS 1.3", []testbed.Packet{
			seg(40000, 15008, testbed.SYN, nil), seg(40000, 15008, testbed.ACK|testbed.PSH, hello13), seg(15008, 40000, testbed.ACK|testbed.PSH, record)}, 1, ""},
		{"the same connection carrying a later flow", []testbed.Packet{seg(40000, 15008, testbed.ACK|testbed.PSH, record)}, 1, ""},
		{"another connection seen only in the middle", []testbed.Packet{seg(40001, 15008, testbed.ACK|testbed.PSH, record)}, 1, "nor continues a connection"},
		{"TLS 1.2", []testbed.Packet{seg(40002, 15008, testbed.SYN, nil), seg(40002, 15008, testbed.ACK|testbed.PSH, hello12)}, 1, "want 1.3"},
		{"plaintext to the application's port", []testbed.Packet{seg(40003, 8080, testbed.ACK|testbed.PSH, []byte("hello\n"))}, 0, "not HBONE (port 15008)"},
		{"nothing between the pods", nil, 0, ""},
	}
	for _, s := range steps {
		n, err := seen.Check(s.pkts, client, server)
		if n != s.wantN {
			t.Errorf("%s: %d connections carried data, want %d", s.name, n, s.wantN)
		}
		switch {
		case s.wantErr == "" && err != nil:
			t.Errorf("%s: %v", s.name, err)
		case s.wantErr != "" && (err == nil || !strings.Contains(err.Error(), s.wantErr)):
			t.Errorf("%s: error %v, want one saying %q", s.name, err, s.wantErr)
		}
	}
}
