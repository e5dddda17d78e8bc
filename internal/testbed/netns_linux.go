//go:build linux

package testbed

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// How a named network namespace lives, and how it can leak.
//
// A name is a file in /run/netns with the namespace (an nsfs file) bind-
// mounted onto it; the mount keeps the namespace alive. The first time
// iproute2's `ip netns add` runs, it asks for /run/netns to propagate its
// mounts as shared; if that fails with EINVAL because /run/netns is a plain
// directory and not a mount point, it bind-mounts /run/netns onto itself
// (recursively) and asks again. If a namespace was mounted in the plain
// directory before, that self bind mount covers it: the directory looks the
// same (it is the same directory), and the recursive bind even copies the
// namespace's mount on top, but the original mount stays underneath. The
// path now reaches only the copy: unmounting it leaves a plain file, and
// unlinking the name fails with EBUSY, because the name is still a mount
// point in this mount namespace. The namespace leaked until reboot.
//
// So the testbed does what iproute2 does before it mounts anything
// (shareNetnsDir): then `ip netns add` finds a mount point, its
// --make-shared succeeds, and it covers nothing. A cover made anyway (a
// process that raced us to the first bind, a testbed made by an older
// mantlet) is found and removed by removeCovered.

// maxStacked bounds the loops that unmount mounts stacked on one path.
const maxStacked = 32

// netnsDirMu serializes shareNetnsDir within the process; a flock on the
// directory serializes it between mantlet processes (go test runs packages
// in parallel). iproute2 takes no lock, so a race with its first run can
// still stack two binds; removeCovered copes with that.
var netnsDirMu sync.Mutex

// shareNetnsDir makes /run/netns a mount point with shared propagation, the
// way iproute2's netns_add does before it binds its first namespace:
// mount --make-rshared /run/netns, and if that fails with EINVAL (not a
// mount point), bind /run/netns onto itself recursively (so that names
// mounted in the plain directory before stay reachable) and try again.
// Shared propagation also means that unmounting a name here unmounts it in
// the mount namespaces copied from this one as slaves (`ip netns exec`), so
// they do not keep the namespace alive. It changes the machine's /run/netns
// mount, as the first `ip netns add` would.
func shareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("testbed: create %s: %w", netnsDir, err)
	}
	dir, err := os.Open(netnsDir)
	if err != nil {
		return fmt.Errorf("testbed: open %s: %w", netnsDir, err)
	}
	defer dir.Close() // releases the lock
	if err := unix.Flock(int(dir.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("testbed: lock %s: %w", netnsDir, err)
	}
	for bound := false; ; bound = true {
		err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || bound {
			return fmt.Errorf("testbed: make %s a shared mount: %w", netnsDir, err)
		}
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("testbed: bind %s onto itself: %w", netnsDir, err)
		}
	}
}

// createNamed creates a network namespace bound at path (in /run/netns,
// which shareNetnsDir prepared) without moving the calling thread: the name
// first, exclusively (a name that exists is never reused), then a new
// namespace bind-mounted onto it.
func createNamed(path string) (netns.NsHandle, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return netns.None(), fmt.Errorf("testbed: create namespace %s: %w", path, err)
	}
	f.Close()
	h := netns.None()
	mounted := false
	err = onThread(func() error {
		var err error
		// New moves this thread into the new namespace; onThread brings it
		// back.
		if h, err = netns.New(); err != nil {
			return fmt.Errorf("new namespace: %w", err)
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind it to the name: %w", err)
		}
		mounted = true
		return nil
	})
	if err != nil {
		if h.IsOpen() {
			h.Close()
		}
		if !mounted {
			_ = os.Remove(path) // ours, and nothing is mounted on it
		} // else the clean-up of the failed build removes it
		return netns.None(), fmt.Errorf("testbed: create namespace %s: %w", path, err)
	}
	return h, nil
}

// removal says what removeNamespace found at a name.
type removal struct {
	// ino is the namespace's inode (0: no namespace was mounted there).
	ino uint64
	// covered: the namespace's mount was hidden under a later mount of
	// /run/netns.
	covered bool
}

// removeNamespace deletes every link in the namespace named by path (so
// that nothing is left even if a process keeps the namespace alive), then
// unmounts and removes the name. A name whose mount is covered is removed
// by removeCovered.
func removeNamespace(path string) (removal, error) {
	var r removal
	var errs []error
	if ino, ok := nsfsInode(path); ok {
		r.ino = ino
		errs = append(errs, deleteLinksAt(path))
		if _, err := unmountAll(path); err != nil {
			return r, errors.Join(append(errs, err)...)
		}
		err := unix.Unlink(path)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return r, errors.Join(errs...)
		}
		if !errors.Is(err, unix.EBUSY) {
			return r, errors.Join(append(errs, fmt.Errorf("testbed: remove namespace %s: %w", path, err))...)
		}
		// EBUSY: the name is still a mount point in this mount namespace,
		// out of sight: what we unmounted was a copy on a cover.
		r.covered = true
	}
	// Not a namespace at the path (a cover with a plain file, or a name
	// whose mount failed), or one still mounted underneath.
	c, err := removeCovered(path)
	if r.ino == 0 {
		r.ino = c.ino
	}
	r.covered = r.covered || c.covered
	return r, errors.Join(append(errs, err)...)
}

// removeCovered removes the name path whatever covers it.
//
// The name's mount cannot be reached from this mount namespace: every
// lookup of /run/netns/<name> ends on the top mount of /run/netns, and that
// mount must stay (other processes use it). But the kernel refuses to
// unlink a name only while the name is a mount point in the caller's own
// mount namespace, and once it is unlinked it detaches the mounts on it in
// every mount namespace. So removeCovered makes a private copy of the mount
// namespace for one thread, peels the mounts of /run/netns off in that copy
// until the name's own mount shows (deleting the namespace's links through
// it), unmounts it there and unlinks the name: the mount in the real mount
// namespace goes with it. Nothing propagates out of the copy (every mount in
// it is made private first), and the copy dies with the thread.
func removeCovered(path string) (removal, error) {
	type result struct {
		r   removal
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread must not run any other goroutine in
		// the copy. It exits with this goroutine.
		runtime.LockOSThread()
		r, err := removeCoveredHere(path)
		done <- result{r, err}
	}()
	res := <-done
	return res.r, res.err
}

func removeCoveredHere(path string) (removal, error) {
	var r removal
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return r, fmt.Errorf("testbed: remove namespace %s: private mount namespace: %w", path, err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return r, fmt.Errorf("testbed: remove namespace %s: make the private mount namespace's mounts private: %w", path, err)
	}
	var errs []error
	for layer := 0; layer < maxStacked; layer++ {
		if ino, ok := nsfsInode(path); ok && r.ino == 0 {
			r.ino = ino
			errs = append(errs, deleteLinksAt(path))
		}
		n, err := unmountAll(path)
		if err != nil {
			return r, errors.Join(append(errs, err)...)
		}
		r.covered = r.covered || (n > 0 && layer > 0)
		err = unix.Unlink(path)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return r, errors.Join(errs...)
		}
		if !errors.Is(err, unix.EBUSY) {
			return r, errors.Join(append(errs, fmt.Errorf("testbed: remove namespace %s: %w", path, err))...)
		}
		// Still mounted below: take the top mount of /run/netns off (here
		// only) and look again.
		if err := unix.Unmount(netnsDir, unix.MNT_DETACH); err != nil {
			return r, errors.Join(append(errs, fmt.Errorf("testbed: remove namespace %s: busy, and no mount of %s covers it: %w", path, netnsDir, err))...)
		}
	}
	return r, errors.Join(append(errs, fmt.Errorf("testbed: remove namespace %s: still busy under %d mounts of %s", path, maxStacked, netnsDir))...)
}

// unmountAll unmounts every mount stacked on path and returns how many
// there were.
func unmountAll(path string) (int, error) {
	for n := 0; n < maxStacked; n++ {
		err := unix.Unmount(path, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return n, nil // no (more) mount there
		}
		if err != nil {
			return n, fmt.Errorf("testbed: unmount namespace %s: %w", path, err)
		}
	}
	return maxStacked, fmt.Errorf("testbed: unmount namespace %s: more than %d mounts on it", path, maxStacked)
}

// nsfsInode returns the inode of the namespace mounted at path, and false
// if path is not a namespace (a plain file, or nothing).
func nsfsInode(path string) (uint64, bool) {
	var fs unix.Statfs_t
	if unix.Statfs(path, &fs) != nil || fs.Type != unix.NSFS_MAGIC {
		return 0, false
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0, false
	}
	return st.Ino, true
}

// deleteLinksAt deletes every link but loopback in the namespace at path.
func deleteLinksAt(path string) error {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("testbed: open namespace %s: %w", path, err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return fmt.Errorf("testbed: namespace %s: netlink handle: %w", path, err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("testbed: namespace %s: list links: %w", path, err)
	}
	var errs []error
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		// A veth's peer in another testbed namespace may be gone already.
		if err := nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("testbed: namespace %s: delete link %s: %w", path, l.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}
