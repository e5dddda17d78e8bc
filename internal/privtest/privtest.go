// Package privtest gates tests that need root (network namespaces, eBPF,
// bpffs). Outside CI such tests skip with a message; under CI=true a skip
// would hide a broken suite, so the test fails instead. Tests that mount
// things under /run run in a mount namespace of their own
// (InMountNamespace), so that the machine's mounts stay as they were.
package privtest

import (
	"os"
	"testing"
)

// Require stops t unless the process runs as root. Under CI=true it fails
// the test rather than skipping it.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if InCI() {
		t.Fatalf("%s needs root, and CI runs as root: running it unprivileged under CI=true is a broken set-up, not a skip", t.Name())
	}
	t.Skipf("%s needs root (network namespaces, eBPF); skipped: run 'sudo make test' to include it", t.Name())
}

// InCI reports whether the CI environment variable says we run under CI.
func InCI() bool {
	v := os.Getenv("CI")
	return v == "true" || v == "1"
}
