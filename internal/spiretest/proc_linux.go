//go:build linux

package spiretest

import (
	"os"
	"syscall"
)

// sysProcAttr puts a process in a process group of its own and kills it
// when the launcher's thread exits (see launcher).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// killGroup sends SIGKILL to the process's group.
func killGroup(p *os.Process) error { return syscall.Kill(-p.Pid, syscall.SIGKILL) }
