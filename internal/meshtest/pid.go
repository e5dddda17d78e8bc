package meshtest

import "fmt"

// AgentPID returns the process ID of node's running agent (nsenter execs
// the agent, so it is the process meshtest started), for example to read
// its CPU time from /proc.
func (m *Mesh) AgentPID(node string) (int, error) {
	p, err := m.proc(node)
	if err != nil {
		return 0, err
	}
	if p.exited() {
		return 0, fmt.Errorf("meshtest: agent of %s is not running", node)
	}
	return p.cmd.Process.Pid, nil
}
