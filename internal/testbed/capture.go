package testbed

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"time"
)

// ErrCaptureLost is returned by Capture.Stop, with the packets it did keep,
// when frames were lost (buffer limit reached, kernel drops, or a frame
// larger than the read buffer): an assertion that something was NOT seen
// would then prove nothing.
var ErrCaptureLost = errors.New("testbed: capture lost packets")

// Capture limits: beyond them frames are counted as lost.
const (
	captureMaxPackets = 1 << 20
	captureMaxBytes   = 64 << 20
)

// IP protocol numbers in Packet.Proto.
const (
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
)

// TCPFlags are the flags of a TCP segment.
type TCPFlags uint8

// TCP flags.
const (
	FIN TCPFlags = 1 << iota
	SYN
	RST
	PSH
	ACK
	URG
)

// Has reports whether all of want are set.
func (f TCPFlags) Has(want TCPFlags) bool { return f&want == want }

// String lists the flags, e.g. "SYN|ACK".
func (f TCPFlags) String() string {
	names := []string{"FIN", "SYN", "RST", "PSH", "ACK", "URG"}
	var set []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			set = append(set, n)
		}
	}
	if len(set) == 0 {
		return "none"
	}
	return strings.Join(set, "|")
}

// Packet is one IPv4 packet seen on the underlay.
type Packet struct {
	Time time.Time
	// Node is the node whose uplink put the packet on the underlay.
	Node string
	// Proto is the IP protocol (ProtoTCP, ProtoUDP, ProtoICMP, ...).
	Proto uint8
	// Src and Dst carry ports for TCP and UDP, port 0 otherwise.
	Src, Dst netip.AddrPort
	// Seq and Flags are set for TCP.
	Seq   uint32
	Flags TCPFlags
	// Payload is the TCP or UDP payload (for other protocols, everything
	// after the IP header).
	Payload []byte
}

// parseFrame decodes an Ethernet frame holding IPv4. It reports false for
// anything else (ARP, truncated headers, later fragments).
func parseFrame(frame []byte) (Packet, bool) {
	var p Packet
	if len(frame) < 14+20 || binary.BigEndian.Uint16(frame[12:14]) != 0x0800 {
		return p, false
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || ihl < 20 || len(ip) < ihl {
		return p, false
	}
	if binary.BigEndian.Uint16(ip[6:8])&0x1fff != 0 {
		return p, false // not the first fragment: no transport header
	}
	// The total length bounds the packet (frames may be padded); GSO
	// packets seen before segmentation may carry 0 or less than the frame.
	if total := int(binary.BigEndian.Uint16(ip[2:4])); total >= ihl && total < len(ip) {
		ip = ip[:total]
	}
	p.Proto = ip[9]
	src, _ := netip.AddrFromSlice(ip[12:16])
	dst, _ := netip.AddrFromSlice(ip[16:20])
	body := ip[ihl:]
	switch p.Proto {
	case ProtoTCP:
		if len(body) < 20 {
			return p, false
		}
		off := int(body[12]>>4) * 4
		if off < 20 || len(body) < off {
			return p, false
		}
		p.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(body[0:2]))
		p.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(body[2:4]))
		p.Seq = binary.BigEndian.Uint32(body[4:8])
		p.Flags = TCPFlags(body[13] & 0x3f)
		body = body[off:]
	case ProtoUDP:
		if len(body) < 8 {
			return p, false
		}
		p.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(body[0:2]))
		p.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(body[2:4]))
		body = body[8:]
	default:
		p.Src, p.Dst = netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0)
	}
	p.Payload = bytes.Clone(body)
	return p, true
}

// Stream is one direction of a TCP connection, reassembled.
type Stream struct {
	Src, Dst netip.AddrPort
	// Data is the payload in sequence order, retransmissions removed.
	Data []byte
	// Gaps is true when some bytes were never seen (Data then joins
	// the pieces around the holes).
	Gaps bool
}

// Streams reassembles the TCP payloads of pkts into one Stream per
// direction of each connection, in order of first appearance.
func Streams(pkts []Packet) []Stream {
	type seg struct {
		off  int64
		data []byte
	}
	type flow struct {
		src, dst netip.AddrPort
		base     uint32
		segs     []seg
	}
	var order []*flow
	flows := map[[2]netip.AddrPort]*flow{}
	for _, p := range pkts {
		if p.Proto != ProtoTCP {
			continue
		}
		key := [2]netip.AddrPort{p.Src, p.Dst}
		f := flows[key]
		syn := p.Flags.Has(SYN)
		// A SYN with another initial sequence number on a known tuple is a
		// new connection reusing it: it gets a stream of its own.
		if f == nil || syn && f.base != p.Seq+1 {
			f = &flow{src: p.Src, dst: p.Dst, base: p.Seq}
			if syn {
				f.base++
			}
			flows[key] = f
			order = append(order, f)
		}
		if len(p.Payload) > 0 {
			f.segs = append(f.segs, seg{off: int64(int32(p.Seq - f.base)), data: p.Payload})
		}
	}
	out := make([]Stream, 0, len(order))
	for _, f := range order {
		s := Stream{Src: f.src, Dst: f.dst}
		// Insertion sort keeps this dependency-free; segments mostly
		// arrive in order.
		for i := 1; i < len(f.segs); i++ {
			for j := i; j > 0 && f.segs[j].off < f.segs[j-1].off; j-- {
				f.segs[j], f.segs[j-1] = f.segs[j-1], f.segs[j]
			}
		}
		var next int64
		if len(f.segs) > 0 {
			next = f.segs[0].off
		}
		for _, sg := range f.segs {
			end := sg.off + int64(len(sg.data))
			switch {
			case end <= next:
				continue // retransmitted
			case sg.off > next:
				s.Gaps = true
				s.Data = append(s.Data, sg.data...)
			default:
				s.Data = append(s.Data, sg.data[next-sg.off:]...)
			}
			next = end
		}
		out = append(out, s)
	}
	return out
}

// Contains reports whether marker appears in clear anywhere in pkts: in a
// reassembled TCP stream (so a marker split across segments counts) or in
// the payload of any other packet.
func Contains(pkts []Packet, marker []byte) bool {
	for _, p := range pkts {
		if p.Proto != ProtoTCP && bytes.Contains(p.Payload, marker) {
			return true
		}
	}
	for _, s := range Streams(pkts) {
		if bytes.Contains(s.Data, marker) {
			return true
		}
	}
	return false
}
