//go:build !linux

package ztunnel

import (
	"errors"
	"syscall"
)

// setSockopts fails: socket marks and transparent sockets are Linux-only.
func setSockopts(string, syscall.RawConn, int, bool) error {
	return errors.New("ztunnel: SO_MARK and IP_TRANSPARENT need Linux")
}
