//go:build linux

package privtest

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountNSEnv tells a re-run test binary which test it runs in a mount
// namespace of its own, and the mount namespace of its parent.
const mountNSEnv = "MANTLET_PRIVTEST_MOUNTNS"

// InMountNamespace runs the calling test in a child process (the same test
// binary, only this test) that has a mount namespace of its own, with every
// mount private and an empty tmpfs on /run. The test can then mount,
// unmount and cover things under /run (/run/netns, /run/mantlet) as on a
// freshly booted machine, while the host's /run is never touched; whatever
// it mounts there, and every network namespace that only such a mount
// keeps, disappears when the child exits, even if the test dies half way.
//
// In the parent InMountNamespace runs the child, fails t with the child's
// output if it failed (t.Log shows it otherwise) and returns false: the
// caller returns at once. In the child it returns true and the test goes
// on. It calls Require first. Only top-level tests can use it.
func InMountNamespace(t *testing.T) bool {
	t.Helper()
	Require(t)
	if strings.Contains(t.Name(), "/") {
		t.Fatalf("privtest: InMountNamespace in subtest %s: only top-level tests can be re-run alone", t.Name())
	}
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatalf("privtest: own mount namespace: %v", err)
	}
	if v, ok := os.LookupEnv(mountNSEnv); ok {
		name, parent, _ := strings.Cut(v, " ")
		if name != t.Name() {
			t.Fatalf("privtest: %s=%q, but this is test %s", mountNSEnv, v, t.Name())
		}
		enterFreshRun(t, self, parent)
		return true
	}
	runInChild(t, self)
	return false
}

// enterFreshRun sets up the child: it refuses to mount anything unless it
// is in a mount namespace other than its parent's, then makes every mount
// private (again: the fork did it already) and mounts a tmpfs on /run.
func enterFreshRun(t *testing.T, self, parent string) {
	t.Helper()
	if parent == "" || self == parent {
		t.Fatalf("privtest: the child of %s shares its parent's mount namespace %s; refusing to mount anything", t.Name(), self)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		t.Fatalf("privtest: make every mount private: %v", err)
	}
	if err := unix.Mount("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		t.Fatalf("privtest: mount a tmpfs on /run: %v", err)
	}
}

// runInChild re-runs t's test in a child process with a mount namespace of
// its own and reports the outcome on t.
func runInChild(t *testing.T, self string) {
	t.Helper()
	ctx := context.Background()
	timeout := 10 * time.Minute
	if d, ok := t.Deadline(); ok {
		timeout = time.Until(d) - 5*time.Second // leave time to report
	}
	if timeout <= 0 {
		t.Fatalf("privtest: no time left to run %s in a child", t.Name())
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0],
		"-test.run=^"+regexp.QuoteMeta(t.Name())+"$", "-test.count=1", "-test.v",
		"-test.timeout="+timeout.String())
	cmd.Env = append(os.Environ(), mountNSEnv+"="+t.Name()+" "+self)
	// The kernel gives the child a copy of our mounts; Go then makes them
	// all private (mount --make-rprivate /) before it runs the binary, so
	// nothing the child mounts propagates back here.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in a mount namespace of its own: %v\n%s", t.Name(), err, out)
	}
	if !strings.Contains(string(out), "--- PASS: "+t.Name()+" (") {
		t.Fatalf("%s in a mount namespace of its own: the child did not pass the test:\n%s", t.Name(), out)
	}
	t.Logf("%s in a mount namespace of its own:\n%s", t.Name(), out)
}
