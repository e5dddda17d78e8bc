package rawfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Path is a path and its NUL-terminated bytes.
type Path struct {
	s string
	z []byte
}

// NewPath returns p ready for the calls of this package.
func NewPath(p string) Path { return Path{s: p, z: append([]byte(p), 0)} }

// String returns the path.
func (p Path) String() string { return p.s }

// IsZero reports whether p is the zero Path.
func (p Path) IsZero() bool { return p.z == nil }

// Open opens p (openat(2) from the working directory, O_CLOEXEC added)
// without copying the path into a new C string as unix.Open does.
func Open(p Path, flags int) (int, error) {
	at := unix.AT_FDCWD
	for {
		r, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(at), uintptr(unsafe.Pointer(&p.z[0])),
			uintptr(flags|unix.O_CLOEXEC), 0, 0, 0)
		switch errno {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue
		}
		return -1, fmt.Errorf("open %s: %w", p.s, errno)
	}
}

// ReadSmall reads the file at p, which must fit buf, into buf and returns
// how many bytes it read.
func ReadSmall(p Path, buf []byte) (int, error) {
	fd, err := Open(p, unix.O_RDONLY)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read %s: %w", p.s, err)
		}
		return n, nil
	}
}

// DirReader reads directories into a buffer it keeps. It is not safe for
// concurrent use.
type DirReader struct{ buf []byte }

// Each calls fn with the name of every entry of dir but . and ..; name is
// valid only during the call.
func (r *DirReader) Each(dir Path, fn func(name []byte)) error {
	if r.buf == nil {
		r.buf = make([]byte, 8<<10)
	}
	fd, err := Open(dir, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for {
		n, err := unix.Getdents(fd, r.buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", dir.s, err)
		}
		if n <= 0 {
			return nil
		}
		eachName(r.buf[:n], fn)
	}
}

// eachName calls fn with the names of the linux_dirent64 records of b but
// . and ..: inode (8 bytes), offset (8), record length (2), type (1), then
// the name, NUL-terminated.
func eachName(b []byte, fn func(name []byte)) {
	const nameOff = 19
	for len(b) >= nameOff {
		reclen := int(binary.NativeEndian.Uint16(b[16:18]))
		if reclen < nameOff || reclen > len(b) {
			return
		}
		name := b[nameOff:reclen]
		for i, c := range name {
			if c == 0 {
				name = name[:i]
				break
			}
		}
		if string(name) != "." && string(name) != ".." {
			fn(name)
		}
		b = b[reclen:]
	}
}
