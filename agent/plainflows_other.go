//go:build !linux

package agent

import (
	"context"
	"net/netip"
)

// PlainFlows ends STRICT pods' plaintext connections; it needs Linux.
type PlainFlows struct{}

// NewPlainFlows fails off Linux.
func NewPlainFlows(nodeIPs []netip.Addr) (*PlainFlows, error) { return nil, errNotLinux }

// Close does nothing.
func (p *PlainFlows) Close() {}

// ClosePlaintext fails off Linux.
func (p *PlainFlows) ClosePlaintext(ctx context.Context, ifindex int, podIPs []netip.Addr) ([]netip.AddrPort, error) {
	return nil, errNotLinux
}
