package meshtest

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

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
// sees what the kernel alone does with the data path. It returns once
// every thread of the agent is stopped. thaw sends SIGCONT; Close and
// StopAgent thaw a frozen agent too.
func (m *Mesh) FreezeAgent(node string) (thaw func() error, err error) {
	p, err := m.proc(node)
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("meshtest: freeze the agent of %s: %w", node, err)
	}
	if err := waitStopped(p.cmd.Process.Pid, m.opts.StopTimeout); err != nil {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
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

// waitStopped waits until every thread of process pid is stopped (state T
// in /proc), for at most timeout. kill returns once SIGSTOP is queued; the
// kernel stops the other threads only when the thread it picked has run to
// take the signal, and on a loaded machine another thread, woken by what
// the caller does next (a routing change the agent watches), can act first.
func waitStopped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		running, err := runningThreads(pid)
		switch {
		case err != nil:
			return err
		case running == 0:
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("%d threads of process %d still run %v after SIGSTOP", running, pid, timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

// runningThreads counts the threads of process pid that are neither
// stopped nor dead.
func runningThreads(pid int) (int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("threads of process %d: %w", pid, err)
	}
	running := 0
	for _, t := range tasks {
		stat, err := os.ReadFile(filepath.Join(dir, t.Name(), "stat"))
		if errors.Is(err, fs.ErrNotExist) {
			continue // the thread ended
		}
		if err != nil {
			return 0, fmt.Errorf("threads of process %d: %w", pid, err)
		}
		// The state follows the command name, which is in parentheses
		// and may hold anything.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 || i+2 >= len(stat) {
			return 0, fmt.Errorf("threads of process %d: malformed %s/stat", pid, t.Name())
		}
		switch stat[i+2] {
		case 'T', 'Z', 'X': // stopped, or dead
		default:
			running++
		}
	}
	return running, nil
}
