//go:build !linux

package meshtest

import (
	"errors"
	"os"
	"syscall"
)

var sigterm = os.Interrupt

func sysProcAttr() *syscall.SysProcAttr { return nil }

// Attached counts the eBPF programs on one interface, by hook.
type Attached struct {
	Ingress, Egress int
}

// AttachedPrograms fails off Linux.
func (m *Mesh) AttachedPrograms(node, ifname string) (Attached, error) {
	return Attached{}, errors.New("meshtest: needs Linux")
}

// SkLookupPrograms fails off Linux.
func (m *Mesh) SkLookupPrograms(node string) (int, error) {
	return 0, errors.New("meshtest: needs Linux")
}

// FreezeAgent fails off Linux.
func (m *Mesh) FreezeAgent(node string) (func() error, error) {
	return nil, errors.New("meshtest: needs Linux")
}

func thaw(p *agentProc) {}
