package testbed

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// frame builds an Ethernet frame with an IPv4 packet; tcp adds a TCP
// header with seq and flags, else a UDP header.
func frame(src, dst string, sport, dport uint16, tcp bool, seq uint32, flags TCPFlags, payload string) []byte {
	var l4 []byte
	if tcp {
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint32(l4[4:], seq)
		l4[12] = 5 << 4
		l4[13] = byte(flags)
	} else {
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(payload)))
	}
	binary.BigEndian.PutUint16(l4[0:], sport)
	binary.BigEndian.PutUint16(l4[2:], dport)
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)+len(payload)))
	ip[8] = 64
	ip[9] = ProtoUDP
	if tcp {
		ip[9] = ProtoTCP
	}
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	eth := make([]byte, 14)
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	out := append(append(append(eth, ip...), l4...), payload...)
	return append(out, make([]byte, 6)...) // Ethernet padding, not payload
}

func TestParseFrameDecodesTCPAndUDP(t *testing.T) {
	tests := []struct {
		name  string
		frame []byte
		ok    bool
		want  Packet
	}{
		{"TCP SYN", frame("198.19.1.11", "198.19.2.11", 40000, 15008, true, 7, SYN, ""), true,
			Packet{Proto: ProtoTCP, Src: netip.MustParseAddrPort("198.19.1.11:40000"), Dst: netip.MustParseAddrPort("198.19.2.11:15008"), Seq: 7, Flags: SYN}},
		{"TCP data", frame("198.19.1.11", "198.19.2.11", 40000, 80, true, 8, PSH|ACK, "hello"), true,
			Packet{Proto: ProtoTCP, Src: netip.MustParseAddrPort("198.19.1.11:40000"), Dst: netip.MustParseAddrPort("198.19.2.11:80"), Seq: 8, Flags: PSH | ACK, Payload: []byte("hello")}},
		{"UDP", frame("198.18.0.1", "198.18.0.2", 53, 5353, false, 0, 0, "dns"), true,
			Packet{Proto: ProtoUDP, Src: netip.MustParseAddrPort("198.18.0.1:53"), Dst: netip.MustParseAddrPort("198.18.0.2:5353"), Payload: []byte("dns")}},
		{"ARP", append(make([]byte, 12), 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), false, Packet{}},
		{"truncated TCP header", frame("198.19.1.11", "198.19.2.11", 1, 2, true, 0, SYN, "")[:14+20+10], false, Packet{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseFrame(tt.frame)
			if ok != tt.ok {
				t.Fatalf("ok = %v, want %v", ok, tt.ok)
			}
			if !ok {
				return
			}
			if got.Proto != tt.want.Proto || got.Src != tt.want.Src || got.Dst != tt.want.Dst || got.Seq != tt.want.Seq || got.Flags != tt.want.Flags || string(got.Payload) != string(tt.want.Payload) {
				t.Errorf("got %+v (flags %v)\nwant %+v (flags %v)", got, got.Flags, tt.want, tt.want.Flags)
			}
		})
	}
}

func TestStreamsReassembleOutOfOrderAndRetransmittedSegments(t *testing.T) {
	a, b := netip.MustParseAddrPort("198.19.1.11:40000"), netip.MustParseAddrPort("198.19.2.11:80")
	seg := func(src, dst netip.AddrPort, seq uint32, flags TCPFlags, data string) Packet {
		return Packet{Proto: ProtoTCP, Src: src, Dst: dst, Seq: seq, Flags: flags, Payload: []byte(data)}
	}
	var base uint32 = 0xfffffffe // the sequence numbers wrap around inside the stream
	pkts := []Packet{
		seg(a, b, base, SYN, ""),
		seg(b, a, 500, SYN|ACK, ""),
		seg(a, b, base+1, ACK|PSH, "mant"),
		seg(a, b, base+9, ACK|PSH, "mark"), // before its predecessor
		seg(a, b, base+5, ACK|PSH, "let-"),
		seg(a, b, base+5, ACK|PSH, "let-"), // retransmitted
		seg(b, a, 501, ACK|PSH, "ok"),
		{Proto: ProtoUDP, Src: a, Dst: b, Payload: []byte("datagram")},
	}
	streams := Streams(pkts)
	if len(streams) != 2 {
		t.Fatalf("got %d streams, want 2", len(streams))
	}
	if s := streams[0]; s.Src != a || string(s.Data) != "mantlet-mark" || s.Gaps {
		t.Errorf("client stream = %s -> %s %q gaps=%v, want %q", s.Src, s.Dst, s.Data, s.Gaps, "mantlet-mark")
	}
	if s := streams[1]; s.Src != b || string(s.Data) != "ok" {
		t.Errorf("server stream = %q", s.Data)
	}
	withHole := Streams([]Packet{seg(a, b, 1, SYN, ""), seg(a, b, 2, ACK, "ab"), seg(a, b, 10, ACK, "yz")})
	if !withHole[0].Gaps || string(withHole[0].Data) != "abyz" {
		t.Errorf("stream with a hole = %q gaps=%v, want %q with gaps", withHole[0].Data, withHole[0].Gaps, "abyz")
	}
	reused := Streams([]Packet{seg(a, b, 100, SYN, ""), seg(a, b, 101, ACK, "first"), seg(a, b, 100, SYN, ""), seg(a, b, 9000, SYN, ""), seg(a, b, 9001, ACK, "second")})
	if len(reused) != 2 || string(reused[0].Data) != "first" || string(reused[1].Data) != "second" {
		t.Errorf("a reused tuple gave streams %+v, want %q then %q", reused, "first", "second")
	}
	for _, tt := range []struct {
		marker string
		want   bool
	}{{"let-mark", true}, {"datagram", true}, {"mantlet-mark-", false}, {"secret", false}} {
		if got := Contains(pkts, []byte(tt.marker)); got != tt.want {
			t.Errorf("Contains(%q) = %v, want %v", tt.marker, got, tt.want)
		}
	}
}

func TestTCPFlagsString(t *testing.T) {
	for f, want := range map[TCPFlags]string{SYN: "SYN", SYN | ACK: "SYN|ACK", FIN | PSH | ACK: "FIN|PSH|ACK", 0: "none"} {
		if got := f.String(); got != want {
			t.Errorf("%#x.String() = %q, want %q", uint8(f), got, want)
		}
	}
}
