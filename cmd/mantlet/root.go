package main

import (
	"fmt"
	"os"
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

// requireRootAgent checks that 'mantlet agent' runs as root before it
// touches anything, so that a permission error never passes for a missing
// CA or an old kernel.
func requireRootAgent() error {
	if geteuid() == 0 {
		return nil
	}
	return needsRoot("it loads eBPF programs, changes the node's routing and binds transparent sockets", "in Kubernetes the DaemonSet runs it privileged")
}

// requireRootTestbed checks that 'mantlet testbed' runs as root.
func requireRootTestbed() error {
	if geteuid() == 0 {
		return nil
	}
	return needsRoot("it builds network namespaces", "for example: sudo ./bin/mantlet testbed ...")
}
