package file

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Masks of the inotify watches. The folders are watched for names that
// appear, go or move, never for writes to the files in them: the kernel
// then does not even deliver the writes of a busy log next to the file.
// The file itself is watched for writes and metadata changes.
const (
	dirMask  = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR
	fileMask = unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF
)

// notifier signals on C when the file may have changed. It watches, with
// inotify, the file the path resolves to and the folders holding it and
// the symbolic links on the way (see resolve), and signals only for
// events about those.
type notifier struct {
	path string
	f    *os.File // the inotify descriptor, in the runtime's poller
	fd   int      // the same, for inotify_add_watch (f.Fd would make f blocking)
	// C receives a value, coalesced, after events about the file.
	C chan struct{}
	// Err receives the error that stopped the notifier, if one did.
	Err chan error

	// events counts the inotify events read, and updates the calls of
	// update, for tests.
	events, updates atomic.Uint64

	mu    sync.Mutex
	dirs  map[int]string // watch descriptor → folder
	names []string       // paths whose events matter
	file  int            // watch descriptor of the file, -1 if none
	// What the last update found, for stale: the folders it watched and
	// how many watches they had, the identity of each name and folder,
	// and of the file the path led to (taken before it resolved the
	// path); whole is false when a watch could not be added.
	folders []string
	nwatch  int
	ids     []fileID // of names, then of folders; zero for a missing one
	target  fileID
	whole   bool
}

func newNotifier(path string) (*notifier, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("manifest: inotify: %w", err)
	}
	n := &notifier{path: path, f: os.NewFile(uintptr(fd), "inotify"), fd: fd, C: make(chan struct{}, 1), Err: make(chan error, 1),
		dirs: map[int]string{}, file: -1}
	if err := n.update(); err != nil {
		n.f.Close()
		return nil, err
	}
	go n.read()
	return n, nil
}

func (n *notifier) close() { n.f.Close() }

// update resolves the path again (a symbolic link may point elsewhere
// now) and moves the watches to what now matters.
func (n *notifier) update() error {
	n.updates.Add(1)
	// The file the path leads to is taken before the path is resolved: a
	// change in between shows as a different file at the next stale.
	target, _ := statID(n.path, true)
	names, dirs := resolve(n.path)
	ids := make([]fileID, 0, len(names)+len(dirs))
	for _, p := range slices.Concat(names, dirs) {
		id, _ := statID(p, false)
		ids = append(ids, id)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []error
	keep := map[int]bool{}
	for _, d := range dirs {
		wd, err := unix.InotifyAddWatch(n.fd, d, dirMask)
		if err != nil {
			errs = append(errs, fmt.Errorf("manifest: watch %s: %w", d, err))
			continue
		}
		n.dirs[wd], keep[wd] = d, true
	}
	file := -1
	if wd, err := unix.InotifyAddWatch(n.fd, names[len(names)-1], fileMask); err == nil {
		file = wd // the file may be missing: its folder tells when it is back
	}
	if n.file >= 0 && n.file != file && !keep[n.file] {
		_, _ = unix.InotifyRmWatch(n.fd, uint32(n.file)) // fails when the old file is gone, and its watch with it
	}
	for wd := range n.dirs {
		if !keep[wd] {
			_, _ = unix.InotifyRmWatch(n.fd, uint32(wd))
			delete(n.dirs, wd)
		}
	}
	n.names, n.file = names, file
	n.folders, n.nwatch, n.ids, n.target, n.whole = dirs, len(n.dirs), ids, target, len(errs) == 0 && file >= 0
	return errors.Join(errs...)
}

// stale reports whether the watches may no longer fit the path, so that
// update must run: the last update could not add every watch, a watch
// went (its file or folder was removed), or the file the path leads to,
// or one of the links, files and folders update found on the way, is not
// the one it found. Changes there normally come as notifications; stale
// is for a poll, in case one was lost, and costs a few stat calls where
// update resolves the path component by component.
func (n *notifier) stale() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.whole || n.file < 0 || len(n.dirs) < n.nwatch {
		return true
	}
	// Without links on the way, the file's own identity below says it.
	if len(n.names) > 1 {
		if id, ok := statID(n.path, true); !ok || id != n.target {
			return true
		}
	}
	for i, p := range n.names {
		if id, ok := statID(p, false); !ok || id != n.ids[i] {
			return true
		}
	}
	for i, p := range n.folders {
		if id, ok := statID(p, false); !ok || id != n.ids[len(n.names)+i] {
			return true
		}
	}
	return false
}

// statID returns the identity of the file at path, following a final
// symbolic link or not; ok is false when there is none.
func statID(path string, follow bool) (id fileID, ok bool) {
	var st unix.Stat_t
	for {
		var err error
		if follow {
			err = unix.Stat(path, &st)
		} else {
			err = unix.Lstat(path, &st)
		}
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fileID{}, false
		}
		return fileID{dev: uint64(st.Dev), ino: st.Ino}, true
	}
}

// read reads events until the descriptor is closed.
func (n *notifier) read() {
	var buf [64 << 10]byte
	for {
		k, err := n.f.Read(buf[:])
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				n.Err <- fmt.Errorf("manifest: read inotify events: %w", err)
			}
			return
		}
		if n.relevant(buf[:k]) {
			select {
			case n.C <- struct{}{}:
			default: // a signal is pending already
			}
		}
	}
}

// relevant says whether a batch of events concerns the file.
func (n *notifier) relevant(b []byte) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	found := false
	for len(b) >= unix.SizeofInotifyEvent {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[0]))
		size := unix.SizeofInotifyEvent + int(ev.Len)
		if size > len(b) {
			break
		}
		name := string(b[unix.SizeofInotifyEvent:size])
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		b = b[size:]
		n.events.Add(1)
		wd := int(ev.Wd)
		switch dir, isDir := n.dirs[wd]; {
		case ev.Mask&unix.IN_Q_OVERFLOW != 0:
			found = true // events were lost
		case wd == n.file:
			found = true
		case isDir && (name == "" || slices.Contains(n.names, filepath.Join(dir, name))):
			found = true // the folder itself went, or a name that matters changed
		}
		if ev.Mask&unix.IN_IGNORED != 0 {
			delete(n.dirs, wd)
			if wd == n.file {
				n.file = -1
			}
		}
	}
	return found
}
