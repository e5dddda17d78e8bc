// Package hbone implements HBONE, the node-to-node tunnel of the mesh: one
// HTTP/2 CONNECT stream per proxied TCP connection, carried over mutual
// TLS 1.3 (ALPN "h2", no SNI) between ztunnels, compatible with Istio's
// HBONE. It holds the protocol only: TLS configurations that present and
// verify X509-SVIDs, a server that accepts CONNECT streams with full
// half-close in both directions, a client pool that multiplexes streams
// over shared connections, and the parsers of CONNECT targets and
// Forwarded headers. Which workload may talk to which is the caller's
// business (package ztunnel).
package hbone

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// DefaultPort is the HBONE port, on the destination pod's IP.
const DefaultPort = 15008

// ALPN is the only application protocol HBONE speaks over TLS.
const ALPN = "h2"

// Tuning holds the HTTP/2 and pool parameters. The zero value of a field
// means its default (see DefaultTuning); docs/performance.md records how
// the defaults were measured.
type Tuning struct {
	// StreamWindow is the receive flow-control window of one stream, in
	// bytes: how much one tunnel may have in flight before the receiver
	// reads it. It is at least HTTP/2's initial 65,535: a client may send
	// that much on a new stream before it has read our SETTINGS.
	StreamWindow int32
	// ConnWindow is the receive window of a whole connection, also at
	// least 65,535 (HTTP/2 has no setting to lower it).
	ConnWindow int32
	// MaxFrameSize is the largest frame payload we accept (SETTINGS
	// MAX_FRAME_SIZE); our own DATA frames are at most the peer's limit and
	// at most the size of one buffer read from the socket.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds a request's decoded header list; larger
	// requests are refused with 431 and ErrHeadersTooLarge.
	MaxHeaderListSize uint32
	// MaxConcurrentStreams is what the server allows per connection
	// (SETTINGS_MAX_CONCURRENT_STREAMS).
	MaxConcurrentStreams uint32
	// MaxStreamsPerConn is how many streams the client puts on one pooled
	// connection before it opens another one.
	MaxStreamsPerConn int
	// MaxConnsPerKey bounds the pooled connections for one (source,
	// destination, destination IP) key; beyond it Connect fails with
	// ErrStreamLimit. A key thus carries at most MaxConnsPerKey *
	// MaxStreamsPerConn streams (25,600 by default): far more than one pod
	// opens to one pod, and still a bound on what one key holds of the
	// descriptor budget.
	MaxConnsPerKey int
	// SpreadConnsPerKey is how many connections of one key the client
	// spreads streams over before it puts two on one: a new stream gets a
	// connection of its own while every connection of its key carries a
	// stream and the key has fewer than this (at most MaxConnsPerKey),
	// and otherwise goes on the one that carries the fewest. Each
	// connection has its own read loop and writer, so parallel bulk
	// streams (iperf3 -P 4) use as many cores. 1, the default, packs
	// streams onto as few connections as MaxStreamsPerConn allows; the
	// agent uses GOMAXPROCS.
	SpreadConnsPerKey int
	// IdleTimeout closes a connection that has carried no stream for this
	// long (client pool and server).
	IdleTimeout time.Duration
	// SpareIdleTimeout closes sooner the idle connections of a pool key
	// beyond the one it keeps for IdleTimeout: a burst of streams that
	// needed many connections leaves one waiting for the next, not all
	// of them, each holding its TLS state, HTTP/2 tables and two
	// goroutines (about 60 KiB) for minutes.
	SpareIdleTimeout time.Duration
	// KeepaliveInterval is how long a client connection may stay silent
	// before it sends a PING; KeepaliveTimeout how long it waits for the
	// answer before it gives the connection up.
	KeepaliveInterval time.Duration
	KeepaliveTimeout  time.Duration
	// HandshakeTimeout bounds TCP connect plus TLS handshake.
	HandshakeTimeout time.Duration
	// KeyExchange is the set of TLS 1.3 key exchange groups the client
	// offers and the server accepts (nil: DefaultKeyExchange).
	KeyExchange KeyExchange

	// MaxConnectionAge bounds how long a connection accepts new streams,
	// with the expiry of the client's and the server's certificates: a
	// connection stops at the earliest of the three (the server sends
	// GOAWAY, the client pool stops using it a margin before and dials a
	// new one with its current certificate). Open streams then get
	// DrainTimeout to finish before the server closes the connection.
	MaxConnectionAge time.Duration
	// DrainTimeout is how long open streams may go on after the server
	// sent GOAWAY for a connection's end of life, an idle close or a
	// shutdown; then the connection is closed and they are reset.
	DrainTimeout time.Duration
	// ResetRate and ResetBurst bound how fast a client may reset streams
	// the server was still working on (RST_STREAM before the server
	// answered the CONNECT): a token bucket of ResetBurst refilled at
	// ResetRate per second (ResetBurst 0: the default, or MaxStreamsPerConn
	// if that is more). Beyond it the client is taken for a "rapid
	// reset" attacker: GOAWAY(ENHANCE_YOUR_CALM), the connection is
	// closed, and Server.Refused gets ErrRapidReset. Well-behaved pools
	// keep at most MaxStreamsPerConn streams per connection, within it.
	ResetRate  float64
	ResetBurst int
	// FloodRate and FloodBurst do the same for frames that make no tunnel
	// work: PING, SETTINGS, empty DATA, PRIORITY and unknown frames,
	// streams refused for the concurrency limit or as malformed
	// (ErrFrameFlood).
	FloodRate  float64
	FloodBurst int
}

// DefaultTuning returns the defaults. Windows and frame size were chosen by
// measurement (BenchmarkTunnelThroughput, docs/performance.md); the header
// limit follows Istio's ztunnel. Streams per pooled connection are twice
// Istio's 100: 10,000 connections from one pod to one pod then take 50
// HBONE connections, not 100, each with its TLS state, buffers and two
// goroutines (about 60 KiB), and their memory is smaller while they are
// open and after (docs/performance.md); ResetBurst stays at least
// MaxStreamsPerConn, so a pool that cancels every stream of a
// connection before its answer is not taken for a rapid-reset attacker.
func DefaultTuning() Tuning {
	return Tuning{
		StreamWindow:         4 << 20,
		ConnWindow:           16 << 20,
		MaxFrameSize:         1 << 20,
		MaxHeaderListSize:    64 << 10,
		MaxConcurrentStreams: 1000,
		MaxStreamsPerConn:    200,
		MaxConnsPerKey:       128,
		SpreadConnsPerKey:    1,
		IdleTimeout:          5 * time.Minute,
		SpareIdleTimeout:     5 * time.Second,
		KeepaliveInterval:    30 * time.Second,
		KeepaliveTimeout:     10 * time.Second,
		HandshakeTimeout:     10 * time.Second,
		KeyExchange:          DefaultKeyExchange(),
		MaxConnectionAge:     time.Hour,
		DrainTimeout:         30 * time.Second,
		ResetRate:            100,
		ResetBurst:           200,
		FloodRate:            1000,
		FloodBurst:           1000,
	}
}

// WithDefaults fills zero fields from DefaultTuning and clamps values to
// what HTTP/2 allows.
func (t Tuning) WithDefaults() Tuning {
	d := DefaultTuning()
	if t.StreamWindow <= 0 {
		t.StreamWindow = d.StreamWindow
	}
	t.StreamWindow = max(t.StreamWindow, 65535)
	if t.ConnWindow <= 0 {
		t.ConnWindow = d.ConnWindow
	}
	t.ConnWindow = max(t.ConnWindow, 65535)
	if t.MaxFrameSize == 0 {
		t.MaxFrameSize = d.MaxFrameSize
	}
	t.MaxFrameSize = min(max(t.MaxFrameSize, 16384), 1<<24-1)
	if t.MaxHeaderListSize == 0 {
		t.MaxHeaderListSize = d.MaxHeaderListSize
	}
	if t.MaxConcurrentStreams == 0 {
		t.MaxConcurrentStreams = d.MaxConcurrentStreams
	}
	if t.MaxStreamsPerConn <= 0 {
		t.MaxStreamsPerConn = d.MaxStreamsPerConn
	}
	if t.MaxConnsPerKey <= 0 {
		t.MaxConnsPerKey = d.MaxConnsPerKey
	}
	if t.SpreadConnsPerKey <= 0 {
		t.SpreadConnsPerKey = d.SpreadConnsPerKey
	}
	t.SpreadConnsPerKey = min(t.SpreadConnsPerKey, t.MaxConnsPerKey)
	if t.IdleTimeout <= 0 {
		t.IdleTimeout = d.IdleTimeout
	}
	if t.SpareIdleTimeout <= 0 {
		t.SpareIdleTimeout = d.SpareIdleTimeout
	}
	t.SpareIdleTimeout = min(t.SpareIdleTimeout, t.IdleTimeout)
	if t.KeepaliveInterval <= 0 {
		t.KeepaliveInterval = d.KeepaliveInterval
	}
	if t.KeepaliveTimeout <= 0 {
		t.KeepaliveTimeout = d.KeepaliveTimeout
	}
	if t.HandshakeTimeout <= 0 {
		t.HandshakeTimeout = d.HandshakeTimeout
	}
	if len(t.KeyExchange) == 0 {
		t.KeyExchange = d.KeyExchange
	}
	if t.MaxConnectionAge <= 0 {
		t.MaxConnectionAge = d.MaxConnectionAge
	}
	if t.DrainTimeout <= 0 {
		t.DrainTimeout = d.DrainTimeout
	}
	if t.ResetRate <= 0 {
		t.ResetRate = d.ResetRate
	}
	if t.ResetBurst <= 0 {
		// At least a connection's streams: a pool of this tuning that
		// cancels them all before their answers is no attacker.
		t.ResetBurst = max(d.ResetBurst, t.MaxStreamsPerConn)
	}
	if t.FloodRate <= 0 {
		t.FloodRate = d.FloodRate
	}
	if t.FloodBurst <= 0 {
		t.FloodBurst = d.FloodBurst
	}
	return t
}

// Errors of the request parsers. The server answers 400 for each.
var (
	// ErrBadTarget: the CONNECT :authority is not a numeric ip:port.
	ErrBadTarget = errors.New("CONNECT target is not ip:port")
	// ErrBadForwarded: the Forwarded header does not parse.
	ErrBadForwarded = errors.New("malformed Forwarded header")
)

// ParseTarget parses a CONNECT :authority. HBONE addresses pods by IP, so
// only a numeric IPv4 or bracketed IPv6 address (no zone) and a port in
// 1..65535 are accepted; IPv4-mapped IPv6 addresses are unmapped. Errors
// wrap ErrBadTarget.
func ParseTarget(authority string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(authority)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("hbone: %w: %q", ErrBadTarget, authority)
	}
	a := ap.Addr()
	if a.Zone() != "" || ap.Port() == 0 || !a.IsValid() || a.IsUnspecified() || a.IsMulticast() {
		return netip.AddrPort{}, fmt.Errorf("hbone: %w: %q", ErrBadTarget, authority)
	}
	// Reject non-canonical spellings such as a leading zero in the port:
	// the target is compared and logged, so one address has one text.
	if strconv.Itoa(int(ap.Port())) != authority[strings.LastIndexByte(authority, ':')+1:] {
		return netip.AddrPort{}, fmt.Errorf("hbone: %w: %q", ErrBadTarget, authority)
	}
	return netip.AddrPortFrom(a.Unmap(), ap.Port()), nil
}

// FormatForwarded returns the Forwarded header value HBONE clients send:
// for="<ip:port>" (RFC 7239; IPv6 in brackets).
func FormatForwarded(client netip.AddrPort) string {
	return `for="` + client.String() + `"`
}

// ParseForwarded extracts the client address of the first forwarded-element
// of an RFC 7239 Forwarded header value. ok is false when the element has
// no "for" parameter or names no address ("unknown", obfuscated
// identifiers); the port is zero when the value carries none. A value that
// does not follow the RFC's grammar returns an error wrapping
// ErrBadForwarded.
func ParseForwarded(v string) (client netip.AddrPort, ok bool, err error) {
	bad := func() (netip.AddrPort, bool, error) {
		return netip.AddrPort{}, false, fmt.Errorf("hbone: %w: %q", ErrBadForwarded, v)
	}
	if len(v) > 1024 {
		return bad()
	}
	// Walk the first element: pairs separated by ';', ending at ',' or the end.
	rest := v
	var forVal string
	found := false
	for {
		rest = strings.TrimLeft(rest, " \t")
		eq := strings.IndexByte(rest, '=')
		if eq <= 0 {
			return bad()
		}
		name := strings.TrimRight(rest[:eq], " \t")
		if !isToken(name) {
			return bad()
		}
		rest = strings.TrimLeft(rest[eq+1:], " \t")
		var val string
		if strings.HasPrefix(rest, `"`) {
			var b strings.Builder
			i := 1
			closed := false
			for i < len(rest) {
				c := rest[i]
				switch {
				case c == '\\' && i+1 < len(rest):
					b.WriteByte(rest[i+1])
					i += 2
					continue
				case c == '"':
					closed = true
				case c < 0x20 && c != '\t' || c == 0x7f:
					return bad()
				default:
					b.WriteByte(c)
				}
				i++
				if closed {
					break
				}
			}
			if !closed {
				return bad()
			}
			val, rest = b.String(), rest[i:]
		} else {
			end := strings.IndexAny(rest, ";, \t")
			if end < 0 {
				end = len(rest)
			}
			val, rest = rest[:end], rest[end:]
			// Ports and IPv6 should be quoted; accept them bare too, as
			// many proxies send them that way.
			if !isBareValue(val) {
				return bad()
			}
		}
		if strings.EqualFold(name, "for") {
			if found {
				return bad() // a parameter may appear once per element
			}
			forVal, found = val, true
		}
		rest = strings.TrimLeft(rest, " \t")
		if rest == "" || rest[0] == ',' {
			break
		}
		if rest[0] != ';' {
			return bad()
		}
		rest = rest[1:]
	}
	if !found {
		return netip.AddrPort{}, false, nil
	}
	return parseNode(forVal, v)
}

// parseNode parses an RFC 7239 node: IPv4, "[IPv6]", either with ":port",
// or "unknown" / an obfuscated identifier (no address).
func parseNode(n, whole string) (netip.AddrPort, bool, error) {
	bad := func() (netip.AddrPort, bool, error) {
		return netip.AddrPort{}, false, fmt.Errorf("hbone: %w: %q", ErrBadForwarded, whole)
	}
	if strings.EqualFold(n, "unknown") || strings.HasPrefix(n, "_") {
		return netip.AddrPort{}, false, nil
	}
	host, port := n, ""
	if strings.HasPrefix(n, "[") {
		end := strings.IndexByte(n, ']')
		if end < 0 {
			return bad()
		}
		host, port = n[1:end], n[end+1:]
		if port != "" {
			if port[0] != ':' {
				return bad()
			}
			port = port[1:]
		}
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return bad()
		}
	} else if i := strings.IndexByte(n, ':'); i >= 0 {
		host, port = n[:i], n[i+1:]
	}
	a, err := netip.ParseAddr(host)
	if err != nil || a.Zone() != "" {
		return bad()
	}
	if !strings.HasPrefix(n, "[") && a.Is6() {
		return bad() // IPv6 must be bracketed
	}
	var p uint64
	if port != "" {
		if strings.HasPrefix(port, "_") {
			return netip.AddrPortFrom(a.Unmap(), 0), true, nil // obfuscated port
		}
		p, err = strconv.ParseUint(port, 10, 16)
		if err != nil || len(port) > 5 {
			return bad()
		}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(p)), true, nil
}

func isBareValue(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c != ':' && c != '[' && c != ']' && !isToken(s[i:i+1]) {
			return false
		}
	}
	return true
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}
