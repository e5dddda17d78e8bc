//go:build !linux

package testbed

import (
	"context"
	"errors"
	"net"
	"os/exec"
)

// errUnsupported is returned on systems without Linux network namespaces.
var errUnsupported = errors.New("testbed: needs Linux network namespaces")

// New fails: the testbed needs Linux.
func New(context.Context, Spec, ...Option) (*Testbed, error) { return nil, errUnsupported }

// Open fails: the testbed needs Linux.
func Open(string, ...Option) (*Testbed, error) { return nil, errUnsupported }

// Remove fails: the testbed needs Linux.
func Remove(string, ...Option) error { return errUnsupported }

// RemoveAll fails: the testbed needs Linux.
func RemoveAll(...Option) ([]string, error) { return nil, errUnsupported }

// Close does nothing.
func (tb *Testbed) Close() error { return nil }

// Capture records the underlay (Linux only).
type Capture struct{}

// Capture fails: the testbed needs Linux.
func (tb *Testbed) Capture(context.Context) (*Capture, error) { return nil, errUnsupported }

// Stop returns nothing.
func (c *Capture) Stop() ([]Packet, error) { return nil, errUnsupported }

func inNamespace(string, func() error) error { return errUnsupported }

func command(ctx context.Context, _ string, name string, args []string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Err = errUnsupported
	return cmd
}

func dial(context.Context, string, string, string) (net.Conn, error) { return nil, errUnsupported }

func listen(context.Context, string, string, string) (net.Listener, error) {
	return nil, errUnsupported
}
