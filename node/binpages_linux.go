package node

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// dropBinaryPages takes the pages of the agent's own executable that are
// mapped read-only (its code, read-only data and the runtime's tables)
// out of the process's resident set, and returns how much memory those
// mappings span. Go runs the init of every package linked in at start
// (client-go's schemes among them, in standalone mode too), which maps
// about 27 MiB of the binary that the agent then never touches again: an
// idle agent uses about 3 MiB of it (docs/performance.md, "Idle
// memory"). The pages stay in the page cache, clean and shared: the ones
// the agent still uses fault back in on their next use, without a read
// from disk, and the rest become reclaimable cache instead of the
// agent's working set. Writable mappings (the binary's data) are left
// alone: their written pages are the process's own.
func dropBinaryPages() (int64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &st); err != nil {
		return 0, fmt.Errorf("executable: %w", err)
	}
	path, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("executable: %w", err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("memory maps: %w", err)
	}
	var spanned int64
	for _, m := range readOnlyMappingsOf(maps, exeFile{path: path, ino: st.Ino, major: unix.Major(st.Dev), minor: unix.Minor(st.Dev)}) {
		// The mapping is the kernel's, not Go's memory: the raw call
		// takes its address as a number (unix.Madvise wants a slice).
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); e != 0 {
			return spanned, fmt.Errorf("madvise %#x-%#x: %w", m.start, m.end, e)
		}
		spanned += int64(m.end - m.start)
	}
	return spanned, nil
}

// mapping is one line of /proc/<pid>/maps.
type mapping struct{ start, end uintptr }

// exeFile names the executable as /proc/<pid>/maps may show it.
type exeFile struct {
	// path is where it was run from (the link /proc/self/exe).
	path string
	// ino and major:minor are its inode and device (stat).
	ino          uint64
	major, minor uint32
}

// readOnlyMappingsOf returns the private, read-only mappings of exe in
// the text of /proc/<pid>/maps. A mapping is exe's when its device and
// inode are, or its path is: for a file on an overlay file system (a
// container's root), kernels have shown the device and inode of the
// layer's file beneath in the maps where stat gives the overlay's (this
// one, 6.18, shows the overlay's in both).
func readOnlyMappingsOf(maps []byte, exe exeFile) []mapping {
	var out []mapping
	dev, ino := fmt.Sprintf("%02x:%02x", exe.major, exe.minor), strconv.FormatUint(exe.ino, 10)
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// start-end perms offset dev inode [path]
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		if !(f[3] == dev && f[4] == ino) && !(len(f) > 5 && strings.Join(f[5:], " ") == exe.path) {
			continue
		}
		if perms := f[1]; len(perms) != 4 || perms[0] != 'r' || perms[1] != '-' || perms[3] != 'p' {
			continue
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		out = append(out, mapping{start: uintptr(start), end: uintptr(end)})
	}
	return out
}
