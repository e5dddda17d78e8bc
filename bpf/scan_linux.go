package bpf

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf/link"
	"github.com/mantlet/mantlet/internal/rawfs"
	"golang.org/x/sys/unix"
)

// The silent check (Watch, four times a second) looks at the pins and the
// links without making garbage: an idle agent allocates little else, and
// what it allocates stays resident until the next collection, which at an
// idle agent's small heap can be minutes away (docs/datapath.md).

// nameScan tells which of a set of names a directory holds.
type nameScan struct {
	dir   rawfs.DirReader
	want  map[string]int // name → index in found
	found []bool
}

// reset forgets the names expected so far.
func (s *nameScan) reset() {
	if s.want == nil {
		s.want = map[string]int{}
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

// scan reads dir and marks the expected names it holds.
func (s *nameScan) scan(dir rawfs.Path) error {
	if err := s.dir.Each(dir, s.mark); err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	return nil
}

// mark marks name if it is expected.
func (s *nameScan) mark(name []byte) {
	if i, ok := s.want[string(name)]; ok {
		s.found[i] = true
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
