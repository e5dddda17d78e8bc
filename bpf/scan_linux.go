package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The silent check (Watch, four times a second) looks at the pins and the
// links without making garbage: an idle agent allocates little else, and
// what it allocates stays resident until the next collection, which at an
// idle agent's small heap can be minutes away (docs/datapath.md).

// nameScan tells which of a set of names a directory holds, reading the
// directory into a buffer it keeps.
type nameScan struct {
	buf   []byte
	want  map[string]int // name → index in found
	found []bool
}

// reset forgets the names expected so far.
func (s *nameScan) reset() {
	if s.want == nil {
		s.want = map[string]int{}
		s.buf = make([]byte, 8<<10)
	}
	clear(s.want)
	s.found = s.found[:0]
}

// expect adds name to the names looked for.
func (s *nameScan) expect(name string) {
	if _, ok := s.want[name]; !ok {
		s.want[name] = len(s.found)
		s.found = append(s.found, false)
	}
}

// has reports whether the last scan found name, an expected name.
func (s *nameScan) has(name string) bool {
	i, ok := s.want[name]
	return ok && s.found[i]
}

// cpath is a path and its NUL-terminated bytes, for system calls that
// must not allocate.
type cpath struct {
	path string
	z    []byte
}

func newCPath(path string) cpath {
	return cpath{path: path, z: append([]byte(path), 0)}
}

// scan reads dir and marks the expected names it holds.
func (s *nameScan) scan(dir cpath) error {
	at := unix.AT_FDCWD
	r, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(at), uintptr(unsafe.Pointer(&dir.z[0])),
		unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0, 0, 0)
	if errno != 0 {
		return fmt.Errorf("bpf: open %s: %w", dir.path, errno)
	}
	fd := int(r)
	defer unix.Close(fd)
	for {
		n, err := unix.Getdents(fd, s.buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("bpf: read %s: %w", dir.path, err)
		}
		if n <= 0 {
			return nil
		}
		s.mark(s.buf[:n])
	}
}

// mark marks the expected names among the linux_dirent64 records of b:
// inode (8 bytes), offset (8), record length (2), type (1), then the name,
// NUL-terminated.
func (s *nameScan) mark(b []byte) {
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
		if i, ok := s.want[string(name)]; ok {
			s.found[i] = true
		}
		b = b[reclen:]
	}
}

// bpfLinkInfo is struct bpf_link_info up to the first member of its
// union: the interface of a tcx link, the network namespace's inode of a
// netns (sk_lookup) link.
type bpfLinkInfo struct {
	typ, id, progID uint32
	_               uint32
	target          uint32
	attachType      uint32
	_               [40]byte
}

// linkInfo asks the kernel about l (BPF_OBJ_GET_INFO_BY_FD) into a record
// it keeps: link.Link's Info allocates some 700 bytes a call.
type linkInfo struct {
	info bpfLinkInfo
	attr struct {
		fd, infoLen uint32
		info        uint64
	}
}

// target returns the type of l and what it is attached to (bpfLinkInfo's
// target).
func (li *linkInfo) target(l link.Link) (typ link.Type, target uint32, err error) {
	fl, ok := l.(interface{ FD() int })
	if !ok {
		return 0, 0, fmt.Errorf("bpf: link %T has no descriptor", l)
	}
	li.info = bpfLinkInfo{}
	li.attr.fd = uint32(fl.FD())
	li.attr.infoLen = uint32(unsafe.Sizeof(li.info))
	// li is on the heap, which does not move: the kernel writes into
	// li.info through the address in li.attr.
	li.attr.info = uint64(uintptr(unsafe.Pointer(&li.info)))
	const objGetInfoByFD = 15 // BPF_OBJ_GET_INFO_BY_FD
	if _, _, errno := unix.Syscall(unix.SYS_BPF, objGetInfoByFD, uintptr(unsafe.Pointer(&li.attr)), unsafe.Sizeof(li.attr)); errno != 0 {
		return 0, 0, fmt.Errorf("bpf: link info: %w", errno)
	}
	return link.Type(li.info.typ), li.info.target, nil
}
