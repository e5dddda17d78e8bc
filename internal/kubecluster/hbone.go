package kubecluster

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/mantlet/mantlet/internal/testbed"
)

// HBONEConns remembers the HBONE connections that a capture saw open (a
// TLS 1.3 ClientHello to port 15008), keyed by (client, server) address.
// The ztunnel pools its connections: a flow tunnelled after the capture
// that saw its connection open rides that connection, and a later capture
// sees it without its handshake.
type HBONEConns map[[2]netip.AddrPort]bool

// Check checks that every TCP stream between the client's and the
// server's pod addresses in pkts is HBONE: from the client to the
// server's port 15008, starting with a TLS 1.3 ClientHello or continuing
// a connection that an earlier Check saw open, or the server's side of
// one. It records the connections it sees open and returns how many
// connections from the client carried data; every stream that is not
// HBONE is in the error.
func (seen HBONEConns) Check(pkts []testbed.Packet, client, server netip.Addr) (int, error) {
	var errs []error
	n := 0
	for _, s := range testbed.Streams(pkts) {
		a, b := s.Src.Addr(), s.Dst.Addr()
		switch {
		case !(a == client && b == server) && !(a == server && b == client):
			continue
		case a == server && s.Src.Port() == 15008:
			continue
		case a != client || s.Dst.Port() != 15008:
			errs = append(errs, fmt.Errorf("a stream %s -> %s between the pods that is not HBONE (port 15008)", s.Src, s.Dst))
			continue
		case len(s.Data) == 0:
			continue
		}
		n++
		key := [2]netip.AddrPort{s.Src, s.Dst}
		h, err := testbed.ParseTLSHello(s.Data)
		switch {
		case err == nil && h.Version() == 0x0304:
			seen[key] = true
		case err == nil:
			errs = append(errs, fmt.Errorf("%s -> %s offers TLS version %#x, want 1.3", s.Src, s.Dst, h.Version()))
		case !seen[key]:
			errs = append(errs, fmt.Errorf("%s -> %s neither starts with a TLS hello (%w) nor continues a connection seen opened with one", s.Src, s.Dst, err))
		}
	}
	return n, errors.Join(errs...)
}
