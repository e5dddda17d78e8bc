package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
	"golang.org/x/sys/unix"
)

// These tests run in a mount namespace of their own with a fresh /run
// (privtest.InMountNamespace), so that what they cover or leave in
// /run/netns stays out of the machine's.

// testbedUpForTest runs `mantlet testbed up` with 1 node and 1 pod (3
// namespaces) and removes the testbed when the test ends.
func testbedUpForTest(t *testing.T, stem string) (prefix, stateDir string) {
	t.Helper()
	stateDir = t.TempDir()
	prefix = randomPrefix(t, stem)
	t.Cleanup(func() { _ = testbed.Remove(prefix, testbed.WithStateDir(stateDir)) })
	e, _, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "up", "--nodes", "1", "--pods-per-node", "1", "--prefix", prefix, "--state-dir", stateDir}); code != 0 {
		t.Fatalf("up: exit code %d; stderr:\n%s", code, errb)
	}
	return prefix, stateDir
}

func TestTestbedDownNamesWhatRemains(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	prefix, dir := testbedUpForTest(t, "tbstk")
	// A directory with something in it can be neither unmounted nor
	// unlinked.
	stuck := "/run/netns/" + prefix + "-pod-stuck"
	if err := os.MkdirAll(filepath.Join(stuck, "in"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(stuck) })

	e, out, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "down", "--prefix", prefix, "--state-dir", dir}); code != 1 {
		t.Fatalf("down: exit code %d, want 1; stdout:\n%s\nstderr:\n%s", code, out, errb)
	}
	want := "mantlet testbed: testbed " + prefix + ": 1 of 4 namespaces remain: " + stuck + " (the state file stays, to remove them later)\n"
	if !strings.Contains(errb.String(), want) {
		t.Errorf("stderr does not say %q:\n%s", want, errb)
	}
	if strings.Contains(out.String()+errb.String(), "removed") {
		t.Errorf("down claims to have removed the testbed; stdout:\n%s\nstderr:\n%s", out, errb)
	}
	if left, _ := filepath.Glob("/run/netns/" + prefix + "-*"); len(left) != 1 || left[0] != stuck {
		t.Errorf("namespaces left: %v, want only %s", left, stuck)
	}
	e, out, _ = testEnv()
	if code := run(context.Background(), e, []string{"testbed", "list", "--state-dir", dir}); code != 0 || !strings.Contains(out.String(), prefix) {
		t.Errorf("list after the failed down: exit code %d, want the testbed still listed:\n%s", code, out)
	}

	// Once the name can go, a second down finishes the job.
	if err := os.RemoveAll(stuck); err != nil {
		t.Fatal(err)
	}
	e, out, errb = testEnv()
	if code := run(context.Background(), e, []string{"testbed", "down", "--prefix", prefix, "--state-dir", dir}); code != 0 {
		t.Fatalf("second down: exit code %d; stderr:\n%s", code, errb)
	}
	if !strings.Contains(out.String(), "removed testbed "+prefix) {
		t.Errorf("second down output:\n%s", out)
	}
}

// TestTestbedDownRemovesACoveredTestbed is the evidence's leak: a testbed
// whose namespaces a later bind mount of /run/netns onto itself covers (as
// `ip netns add` does where /run/netns is not already a shared mount).
func TestTestbedDownRemovesACoveredTestbed(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	prefix, dir := testbedUpForTest(t, "tbcov")
	// Covered mounts that are private do not follow their copies when
	// those are unmounted: that is what hid them.
	if err := unix.Mount("", "/run/netns", "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/run/netns", "/run/netns", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount("/run/netns", unix.MNT_DETACH) })

	e, out, errb := testEnv()
	if code := run(context.Background(), e, []string{"testbed", "down", "--prefix", prefix, "--state-dir", dir}); code != 0 {
		t.Fatalf("down: exit code %d; stderr:\n%s", code, errb)
	}
	if !strings.Contains(out.String(), "removed testbed "+prefix) {
		t.Errorf("down output:\n%s", out)
	}
	if !strings.Contains(errb.String(), "namespace was hidden under a later mount of /run/netns") {
		t.Errorf("down did not say it found covered namespaces:\n%s", errb)
	}
	left, _ := filepath.Glob("/run/netns/" + prefix + "-*")
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 || strings.Contains(string(mountinfo), "/run/netns/"+prefix+"-") {
		t.Errorf("after down: names %v; mounts:\n%s", left, mountinfo)
	}
}
