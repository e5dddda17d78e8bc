//go:build !linux

package bpf

import (
	"context"
	"net"
	"syscall"
)

// ListenConfig returns a configuration whose listeners fail off Linux.
func ListenConfig(mark uint32) net.ListenConfig {
	return net.ListenConfig{Control: func(string, string, syscall.RawConn) error { return errNotLinux }}
}

// Listen fails off Linux.
func Listen(ctx context.Context, address string, mark uint32) (net.Listener, error) {
	return nil, errNotLinux
}
