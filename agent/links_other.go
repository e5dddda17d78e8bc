//go:build !linux

package agent

import (
	"errors"
	"net/netip"
)

var errNotLinux = errors.New("agent: the data path needs Linux")

// RouteLinks finds pods' veths by their routes; it needs Linux.
type RouteLinks struct{}

// NewRouteLinks fails off Linux.
func NewRouteLinks() (*RouteLinks, error) { return nil, errNotLinux }

// Close does nothing.
func (r *RouteLinks) Close() {}

// PodLink fails off Linux.
func (r *RouteLinks) PodLink(ip netip.Addr) (int, error) { return 0, errNotLinux }

// LinksVersion cannot tell changes off Linux.
func (r *RouteLinks) LinksVersion() (version uint64, ok bool) { return 0, false }

// FindUplinks fails off Linux.
func FindUplinks(nodeIPs []netip.Addr) ([]string, error) { return nil, errNotLinux }
