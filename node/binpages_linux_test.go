package node

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDropBinaryPagesShrinksTheResidentExecutable: after the drop, the
// process's read-only mappings of its executable hold a fraction of what
// they held, and the process runs on (the pages fault back in).
func TestDropBinaryPagesShrinksTheResidentExecutable(t *testing.T) {
	before := residentExecutable(t)
	if before < 1<<20 {
		t.Fatalf("the test binary's read-only mappings hold %d KiB; the test needs at least 1 MiB resident to mean anything", before>>10)
	}
	spanned, err := dropBinaryPages()
	if err != nil {
		t.Fatal(err)
	}
	after := residentExecutable(t)
	t.Logf("read-only mappings of the executable: %d KiB resident before, %d KiB after; %d KiB spanned", before>>10, after>>10, spanned>>10)
	if spanned < before {
		t.Errorf("dropBinaryPages spanned %d KiB, less than the %d KiB resident in the mappings it should cover", spanned>>10, before>>10)
	}
	if after > before/2 {
		t.Errorf("after dropBinaryPages the executable's read-only mappings hold %d KiB, want less than half of the %d KiB before", after>>10, before>>10)
	}
}

// residentExecutable sums the Rss of the process's read-only, private
// mappings of its executable, from /proc/self/smaps.
func residentExecutable(t *testing.T) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	ino := strconv.FormatUint(st.Ino, 10)
	dev := strings.Join([]string{hex2(unix.Major(st.Dev)), hex2(unix.Minor(st.Dev))}, ":")
	var sum int64
	counting := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			counting = f[3] == dev && f[4] == ino && strings.HasPrefix(f[1], "r-") && strings.HasSuffix(f[1], "p")
			continue
		}
		if counting && len(f) == 3 && f[0] == "Rss:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatalf("smaps: %q: %v", line, err)
			}
			sum += kb << 10
		}
	}
	return sum
}

func hex2(n uint32) string {
	s := strconv.FormatUint(uint64(n), 16)
	if len(s) < 2 {
		s = "0" + s
	}
	return s
}

// TestReadOnlyMappingsOfPicksTheExecutablesReadOnlyMappings: only the
// file's private mappings without write access, never its data, another
// file's, or anonymous memory.
func TestReadOnlyMappingsOfPicksTheExecutablesReadOnlyMappings(t *testing.T) {
	maps := []byte(`00400000-015f1000 r-xp 00000000 fd:01 1234 /usr/bin/mantlet
015f1000-0288c000 r--p 011f1000 fd:01 1234 /usr/bin/mantlet
0288c000-02e23000 rw-p 0248c000 fd:01 1234 /usr/bin/mantlet
02e23000-04e70000 rw-p 00000000 00:00 0
7f0000000000-7f0000001000 r--p 00000000 fd:01 99 /usr/lib/libc.so.6
7f0000002000-7f0000003000 r--s 00000000 fd:01 1234 /usr/bin/mantlet
7f0000004000-7f0000005000 r-xp 00000000 fd:02 1234 /other/device
garbage line
`)
	want := []mapping{{0x400000, 0x15f1000}, {0x15f1000, 0x288c000}}
	got := readOnlyMappingsOf(maps, exeFile{path: "/usr/bin/mantlet (moved)", ino: 1234, major: 0xfd, minor: 1})
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("by device and inode: readOnlyMappingsOf = %#v, want %#v", got, want)
	}
	// In a container on an overlay, stat gives the overlay's device and
	// inode, the maps the layer's: the path still matches.
	got = readOnlyMappingsOf(maps, exeFile{path: "/usr/bin/mantlet", ino: 777, major: 0, minor: 0x2a})
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("by path: readOnlyMappingsOf = %#v, want %#v", got, want)
	}
}
