package file

import (
	"errors"
	"io/fs"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// fileID identifies a file: its device and inode.
type fileID struct{ dev, ino uint64 }

func (a fileID) same(b fileID) bool { return a == b }

// statVersion stats path as os.Stat does, without os.Stat's garbage (a
// FileInfo for every call): an idle watcher stats its file at every poll,
// and what it allocates adds to the agent's resident size between
// collections.
func statVersion(path string) fileVersion {
	var st unix.Stat_t
	for {
		err := unix.Stat(path, &st)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fileVersion{err: (&fs.PathError{Op: "stat", Path: path, Err: err}).Error()}
		}
		break
	}
	return fileVersion{found: true, size: st.Size, mtime: time.Unix(st.Mtim.Unix()), id: fileID{dev: uint64(st.Dev), ino: st.Ino}}
}

// versionOf is the version fi describes.
func versionOf(fi os.FileInfo) fileVersion {
	v := fileVersion{found: true, size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		v.id = fileID{dev: uint64(st.Dev), ino: st.Ino}
	}
	return v
}
