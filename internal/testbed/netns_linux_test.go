//go:build linux

package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/privtest"
	"golang.org/x/sys/unix"
)

// The tests here run in a mount namespace of their own with a fresh /run
// (privtest.InMountNamespace): /run/netns starts as a plain directory, as
// on a machine that never ran `ip netns add`, and nothing they mount or
// cover is seen by, or can leak to, the rest of the machine.

// mount is one line of /proc/self/mountinfo.
type mount struct {
	id, parent  int
	root, point string
	shared      bool
}

func mounts(t *testing.T) []mount {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root point options [optional...] - type source super
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 {
			continue
		}
		m := mount{root: fields[3], point: fields[4]}
		m.id, _ = strconv.Atoi(fields[0])
		m.parent, _ = strconv.Atoi(fields[1])
		for _, opt := range fields[6:] {
			if opt == "-" {
				break
			}
			m.shared = m.shared || strings.HasPrefix(opt, "shared:")
		}
		ms = append(ms, m)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return ms
}

// netnsDirMounts counts the mounts stacked on /run/netns that the path
// reaches (not those a mount on /run hides), and how many are shared.
func netnsDirMounts(t *testing.T) (n, shared int) {
	t.Helper()
	var stx unix.Statx_t
	err := unix.Statx(unix.AT_FDCWD, netnsDir, 0, unix.STATX_MNT_ID, &stx)
	if errors.Is(err, unix.ENOENT) {
		return 0, 0
	}
	if err != nil {
		t.Fatalf("statx %s: %v", netnsDir, err)
	}
	byID := map[int]mount{}
	for _, m := range mounts(t) {
		byID[m.id] = m
	}
	for id := int(stx.Mnt_id); byID[id].point == netnsDir; id = byID[id].parent {
		n++
		if byID[id].shared {
			shared++
		}
	}
	return n, shared
}

// namespaceInodes returns the inodes of the testbed's namespaces as
// mountinfo spells them ("net:[<inode>]").
func namespaceInodes(t *testing.T, tb *Testbed) []string {
	t.Helper()
	paths := []string{tb.Underlay()}
	for _, n := range tb.Nodes() {
		paths = append(paths, n.NS)
	}
	for _, p := range tb.Pods() {
		paths = append(paths, p.NS)
	}
	var inodes []string
	for _, p := range paths {
		ino, ok := nsfsInode(p)
		if !ok {
			t.Fatalf("%s is not a network namespace", p)
		}
		inodes = append(inodes, fmt.Sprintf("net:[%d]", ino))
	}
	return inodes
}

// checkNothingLeft fails t if a name of the testbed is left in /run/netns,
// if any mount (visible or covered) still holds one of its namespaces, or
// if its state file is left.
func checkNothingLeft(t *testing.T, tb *Testbed, inodes []string) {
	t.Helper()
	if left, _ := existingNamespaces(tb.Prefix()); len(left) > 0 {
		t.Errorf("names left in %s: %v", netnsDir, left)
	}
	for _, m := range mounts(t) {
		if slices.Contains(inodes, m.root) || strings.HasPrefix(m.point, nsPath(tb.Prefix(), "", "")) {
			t.Errorf("mount left: %s of %s", m.point, m.root)
		}
	}
	if _, err := os.Stat(tb.StateFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left: %v", err)
	}
}

// ipNetns runs `ip netns <args>` (iproute2).
func ipNetns(t *testing.T, args ...string) error {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		if privtest.InCI() {
			t.Fatalf("iproute2's ip is not installed: %v", err)
		}
		t.Skipf("iproute2's ip is not installed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "ip", append([]string{"netns"}, args...)...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// addIPNetns adds a namespace with `ip netns add` and deletes it when the
// test ends.
func addIPNetns(t *testing.T, name string) {
	t.Helper()
	if err := ipNetns(t, "add", name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipNetns(t, "delete", name); err != nil {
			t.Error(err)
		}
	})
}

func withPlainNetnsDir() Option { return func(o *options) { o.plainNetnsDir = true } }

// bindNetnsDirOnItself covers /run/netns with a bind mount of itself
// (recursive: with a copy of every mount in it) until the test ends.
func bindNetnsDirOnItself(t *testing.T, recursive bool) {
	t.Helper()
	flags := uintptr(unix.MS_BIND)
	if recursive {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(netnsDir, netnsDir, "none", flags, ""); err != nil {
		t.Fatalf("bind %s onto itself: %v", netnsDir, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(netnsDir, unix.MNT_DETACH) })
}

// TestCoveredNamespacesAreStillRemoved reproduces the leak of the first
// `make demo` on a fresh machine: namespaces bound in a plain /run/netns
// (as mantlet did before it shared the directory), then covered by a bind
// mount of /run/netns onto itself (what `ip netns add` makes there). Close
// must still remove every one of them, hidden mounts included.
func TestCoveredNamespacesAreStillRemoved(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	tests := []struct {
		name  string
		cover func(t *testing.T, tb *Testbed)
	}{
		{"covered by ip netns add, which copies every mount on top", func(t *testing.T, tb *Testbed) {
			// Its mount of /run/netns goes when the test ends, after its
			// namespace.
			t.Cleanup(func() { _ = unix.Unmount(netnsDir, unix.MNT_DETACH) })
			addIPNetns(t, tb.Prefix()+"x")
			if n, _ := netnsDirMounts(t); n != 1 {
				t.Fatalf("ip netns add made %d mounts of %s, want the 1 that covers the testbed", n, netnsDir)
			}
		}},
		{"covered, then the copies on top unmounted by a first Close", func(t *testing.T, tb *Testbed) {
			bindNetnsDirOnItself(t, true)
			paths, _ := existingNamespaces(tb.Prefix())
			for _, p := range paths {
				if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
					t.Fatalf("unmount the copy at %s: %v", p, err)
				}
			}
		}},
		{"covered by a plain bind, which shows plain files on top", func(t *testing.T, tb *Testbed) {
			bindNetnsDirOnItself(t, false)
		}},
		{"covered twice", func(t *testing.T, tb *Testbed) {
			bindNetnsDirOnItself(t, true)
			bindNetnsDirOnItself(t, true)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if n, _ := netnsDirMounts(t); n != 0 {
				t.Fatalf("%s is mounted %d times before the testbed; want a plain directory", netnsDir, n)
			}
			tb := newTestbed(t, SimpleSpec(2, 1, ""), withPlainNetnsDir())
			inodes := namespaceInodes(t, tb)
			tt.cover(t, tb)
			if err := tb.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			checkNothingLeft(t, tb, inodes)
		})
	}
}

// TestIPNetnsAddAfterATestbedCoversNothing checks the fix: the testbed
// makes /run/netns a shared mount of itself before its first namespace, as
// iproute2 does, so a later `ip netns add` has nothing to cover.
func TestIPNetnsAddAfterATestbedCoversNothing(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	tb := newTestbed(t, SimpleSpec(2, 1, ""))
	inodes := namespaceInodes(t, tb)
	if n, shared := netnsDirMounts(t); n != 1 || shared != 1 {
		t.Fatalf("after New, %s is mounted %d times (%d shared); want once, shared", netnsDir, n, shared)
	}
	addIPNetns(t, tb.Prefix()+"x")
	if n, _ := netnsDirMounts(t); n != 1 {
		t.Errorf("after ip netns add, %s is mounted %d times; want still once", netnsDir, n)
	}
	if err := tb.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	checkNothingLeft(t, tb, inodes)
}

// TestTestbedsInARowLeaveNothing builds and removes two testbeds in a row
// on a fresh /run, as two `make demo` runs do: each leaves nothing, and
// the second does not stack another mount on /run/netns.
func TestTestbedsInARowLeaveNothing(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	dir := t.TempDir()
	for i := range 2 {
		tb := newTestbed(t, SimpleSpec(2, 2, "default"), WithStateDir(dir))
		inodes := namespaceInodes(t, tb)
		if err := tb.Close(); err != nil {
			t.Fatalf("Close of testbed %d: %v", i+1, err)
		}
		checkNothingLeft(t, tb, inodes)
		if n, shared := netnsDirMounts(t); n != 1 || shared != 1 {
			t.Errorf("after testbed %d, %s is mounted %d times (%d shared); want once, shared", i+1, netnsDir, n, shared)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) > 0 {
		t.Errorf("state directory not empty: %v", entries)
	}
}

// TestANameThatCannotBeRemovedIsReportedAndKeepsTheStateFile checks that
// Close says what remains instead of claiming success, and keeps the state
// file so that Remove can try again.
func TestANameThatCannotBeRemovedIsReportedAndKeepsTheStateFile(t *testing.T) {
	if !privtest.InMountNamespace(t) {
		return
	}
	tb, err := New(context.Background(), SimpleSpec(1, 1, ""), WithStateDir(t.TempDir()), WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	recordPrefix(tb.Prefix())
	t.Cleanup(func() { _ = Remove(tb.Prefix(), WithStateDir(tb.stateDir)) })
	// A directory with something in it can be neither unmounted nor
	// unlinked.
	stuck := nsPath(tb.Prefix(), "pod", "stuck")
	if err := os.MkdirAll(stuck+"/in", 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(stuck) })
	err = tb.Close()
	want := fmt.Sprintf("testbed %s: 1 of 4 namespaces remain: %s (the state file stays, to remove them later)", tb.Prefix(), stuck)
	if err == nil || !strings.HasPrefix(err.Error(), want+"\n") {
		t.Fatalf("Close = %v, want an error that starts %q", err, want)
	}
	if left, _ := existingNamespaces(tb.Prefix()); !slices.Equal(left, []string{stuck}) {
		t.Errorf("names left: %v, want only %s", left, stuck)
	}
	if _, err := os.Stat(tb.StateFile()); err != nil {
		t.Errorf("state file: %v, want it kept", err)
	}
	if err := os.RemoveAll(stuck); err != nil {
		t.Fatal(err)
	}
	if err := Remove(tb.Prefix(), WithStateDir(tb.stateDir)); err != nil {
		t.Fatalf("Remove once the name can go: %v", err)
	}
	if _, err := os.Stat(tb.StateFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file after Remove: %v", err)
	}
}
