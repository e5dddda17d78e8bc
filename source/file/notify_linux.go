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

	// events counts the inotify events read, for tests.
	events atomic.Uint64

	mu    sync.Mutex
	dirs  map[int]string // watch descriptor → folder
	names []string       // paths whose events matter
	file  int            // watch descriptor of the file, -1 if none
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
	names, dirs := resolve(n.path)
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
	return errors.Join(errs...)
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
