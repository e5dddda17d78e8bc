//go:build linux

package proc

import (
	"errors"
	"os"
	"syscall"
)

// sysProcAttr puts a process in a process group of its own and kills it
// when the launcher's thread exits (see Launcher).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// killGroup sends SIGKILL to the process's group.
func killGroup(p *os.Process) error { return syscall.Kill(-p.Pid, syscall.SIGKILL) }

// Exists reports whether a process with pid exists.
func Exists(pid int) bool {
	return pid > 0 && !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}
