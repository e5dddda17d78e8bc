//go:build !linux

package spiretest

import (
	"os"
	"syscall"
)

// sysProcAttr: elsewhere there is no parent-death signal; Stop kills the
// processes.
func sysProcAttr() *syscall.SysProcAttr { return nil }

// killGroup kills the process.
func killGroup(p *os.Process) error { return p.Kill() }
