package main

import (
	"fmt"
	"os"
	"strings"
)

// geteuid is swapped by tests.
var geteuid = os.Geteuid

// needsRoot returns the error of a command that must run as root: what
// it does that needs root (why), and how to run it so (how).
func needsRoot(why, how string) error {
	return fmt.Errorf("needs root: %s; run it as root (%s)", why, how)
}

// errNeedsRoot says why the scenario command name (demo, bench) cannot run
// unprivileged.
func errNeedsRoot(name string) error {
	return needsRoot("it builds network namespaces and loads eBPF programs", "for example: sudo make "+name)
}

// requireRootAgent checks that 'mantlet agent' runs as root, with the
// capabilities it uses, before it touches anything, so that a permission
// error never passes for a missing CA or an old kernel.
func requireRootAgent() error {
	if geteuid() != 0 {
		return needsRoot("it loads eBPF programs, changes the node's routing and binds transparent sockets", "in Kubernetes the DaemonSet runs it as root with the capabilities NET_ADMIN, BPF and SYS_ADMIN")
	}
	caps, err := effectiveCaps()
	if err != nil {
		return nil // not known here: the operations say what they lack
	}
	return missingAgentCaps(caps)
}

// Capability bits (linux/capability.h).
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capBPF      = 39
)

// missingAgentCaps says which capabilities the agent lacks in caps (a
// CapEff mask), and what for: NET_ADMIN and SYS_ADMIN, and BPF unless
// SYS_ADMIN stands in for it (as it does on every kernel).
func missingAgentCaps(caps uint64) error {
	has := func(bit uint) bool { return caps&(1<<bit) != 0 }
	var missing []string
	if !has(capNetAdmin) {
		missing = append(missing, "CAP_NET_ADMIN (attach tc programs, install the routing rule, transparent sockets)")
	}
	if !has(capSysAdmin) {
		missing = append(missing, "CAP_SYS_ADMIN (enter pods' network namespaces, mount bpffs)")
		if !has(capBPF) {
			missing = append(missing, "CAP_BPF (load eBPF programs and maps)")
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return fmt.Errorf("missing capabilities: %s; give the agent's container the capabilities NET_ADMIN, BPF and SYS_ADMIN (the chart's securityContext does), or run it privileged", strings.Join(missing, ", "))
}

// requireRootTestbed checks that 'mantlet testbed' runs as root.
func requireRootTestbed() error {
	if geteuid() == 0 {
		return nil
	}
	return needsRoot("it builds network namespaces", "for example: sudo ./bin/mantlet testbed ...")
}
