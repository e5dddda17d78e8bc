package meshtest

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var sigterm = syscall.SIGTERM

// sysProcAttr puts an agent in a process group of its own (a Ctrl-C on the
// terminal reaches the caller, which stops the agents in order) and kills
// it if the caller dies. The kernel sends the parent-death signal when the
// thread that started the agent exits; Go keeps its threads for the life
// of the process, except threads a goroutine locked and never unlocked.
// Nothing in meshtest starts agents from such a thread.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// Attached counts the eBPF programs on one interface, by hook.
type Attached struct {
	// Ingress and Egress count tc programs (TCX links and clsact filters).
	Ingress, Egress int
}

// AttachedPrograms counts the tc programs attached to the interface ifname
// of node, whichever way they were attached (TCX or clsact). An agent
// that adopted its pins correctly leaves one per hook it uses.
func (m *Mesh) AttachedPrograms(node, ifname string) (Attached, error) {
	n := m.TB.Node(node)
	if n == nil {
		return Attached{}, fmt.Errorf("meshtest: no node %q", node)
	}
	var a Attached
	err := n.Do(func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("meshtest: %s on %s: %w", ifname, node, err)
		}
		count := func(at ebpf.AttachType, parent uint32) (int, error) {
			c := 0
			res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
			if err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
				return 0, fmt.Errorf("meshtest: query %s programs on %s: %w", at, ifname, err)
			}
			if res != nil {
				c += len(res.Programs)
			}
			filters, err := netlink.FilterList(l, parent)
			if err == nil {
				for _, f := range filters {
					if _, ok := f.(*netlink.BpfFilter); ok {
						c++
					}
				}
			}
			return c, nil
		}
		if a.Ingress, err = count(ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS); err != nil {
			return err
		}
		a.Egress, err = count(ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS)
		return err
	})
	return a, err
}

// SkLookupPrograms counts the sk_lookup programs attached to node's
// network namespace: one when an agent's data path is in place.
func (m *Mesh) SkLookupPrograms(node string) (int, error) {
	n := m.TB.Node(node)
	if n == nil {
		return 0, fmt.Errorf("meshtest: no node %q", node)
	}
	h, err := netns.GetFromPath(n.NS)
	if err != nil {
		return 0, fmt.Errorf("meshtest: open namespace of %s: %w", node, err)
	}
	defer h.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(h), Attach: ebpf.AttachSkLookup})
	if err != nil {
		return 0, fmt.Errorf("meshtest: query sk_lookup programs of %s: %w", node, err)
	}
	return len(res.Programs), nil
}

// FreezeAgent stops node's agent with SIGSTOP: the process keeps its
// sockets (its listeners stay in the SOCKMAP) but does nothing, so a test
// sees what the kernel alone does with the data path. thaw sends SIGCONT;
// Close and StopAgent thaw a frozen agent too.
func (m *Mesh) FreezeAgent(node string) (thaw func() error, err error) {
	p, err := m.proc(node)
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("meshtest: freeze the agent of %s: %w", node, err)
	}
	m.log.Info("agent frozen", "node", node)
	return func() error {
		if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil && !p.exited() {
			return fmt.Errorf("meshtest: thaw the agent of %s: %w", node, err)
		}
		m.log.Info("agent thawed", "node", node)
		return nil
	}, nil
}

// thaw continues a process that FreezeAgent stopped, so that it can act
// on SIGTERM.
func thaw(p *agentProc) { _ = p.cmd.Process.Signal(syscall.SIGCONT) }
