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
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("memory maps: %w", err)
	}
	var spanned int64
	for _, m := range readOnlyMappingsOf(maps, st.Ino, unix.Major(st.Dev), unix.Minor(st.Dev)) {
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

// readOnlyMappingsOf returns the private, read-only mappings of the file
// with inode ino on device major:minor in the text of /proc/<pid>/maps.
func readOnlyMappingsOf(maps []byte, ino uint64, major, minor uint32) []mapping {
	var out []mapping
	dev := fmt.Sprintf("%02x:%02x", major, minor)
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// start-end perms offset dev inode [path]
		f := strings.Fields(sc.Text())
		if len(f) < 5 || f[3] != dev || f[4] != strconv.FormatUint(ino, 10) {
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
