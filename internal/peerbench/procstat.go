package peerbench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc (100 on
// every Linux architecture Go supports).
const clockTicks = 100

// side is the tunnel processes of one side of a path (the client's node
// or the server's node): the root processes the bench started or found,
// and, when measured, every process below them (nginx's workers).
type side struct {
	roots []int
	// throughputOnly are roots that only carry iperf3's connections (a
	// ghostunnel pair for the iperf3 server): their CPU counts, their
	// memory does not (the other peers and mantlet carry it in the
	// processes that are weighed anyway).
	throughputOnly []int
}

// pids returns the roots (all of them) and all their descendants that are
// alive now.
func (s side) pids() ([]int, error) {
	return descendants(append(slices.Clone(s.roots), s.throughputOnly...))
}

// descendants returns roots and all their descendants that are alive now.
func descendants(roots []int) ([]int, error) {
	if len(roots) == 0 {
		return nil, nil
	}
	children, err := childrenByParent()
	if err != nil {
		return nil, err
	}
	var out []int
	seen := map[int]bool{}
	queue := slices.Clone(roots)
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
		queue = append(queue, children[p]...)
	}
	return out, nil
}

// cpu returns the user+system CPU time the side's processes have used.
func (s side) cpu() (time.Duration, error) {
	pids, err := s.pids()
	if err != nil {
		return 0, err
	}
	var total time.Duration
	for _, pid := range pids {
		d, err := processCPU(pid)
		if err != nil {
			return 0, err
		}
		total += d
	}
	return total, nil
}

// rss returns the resident set of the side's processes (not the
// throughput-only ones), in bytes.
func (s side) rss() (int64, error) {
	pids, err := descendants(s.roots)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, pid := range pids {
		n, err := processRSS(pid)
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

// written returns the bytes the side's processes (all of them) have
// written with system calls (wchar of /proc/<pid>/io): what a tunnel
// forwards, it writes.
func (s side) written() (uint64, error) {
	pids, err := s.pids()
	if err != nil {
		return 0, err
	}
	var total uint64
	for _, pid := range pids {
		n, err := processWritten(pid)
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

// processWritten reads wchar from /proc/<pid>/io.
func processWritten(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0, fmt.Errorf("peerbench: bytes written by process %d: %w", pid, err)
	}
	n, err := parseIOWchar(b)
	if err != nil {
		return 0, fmt.Errorf("peerbench: bytes written by process %d: %w", pid, err)
	}
	return n, nil
}

// parseIOWchar returns wchar from the text of /proc/<pid>/io.
func parseIOWchar(io []byte) (uint64, error) {
	for line := range strings.Lines(string(io)) {
		if rest, ok := strings.CutPrefix(line, "wchar:"); ok {
			return strconv.ParseUint(strings.TrimSpace(rest), 10, 64)
		}
	}
	return 0, errors.New("no wchar line")
}

// childrenByParent maps each process ID to its children's, from /proc.
func childrenByParent() (map[int][]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("peerbench: list processes: %w", err)
	}
	out := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		f, err := statFields(string(b))
		if err != nil || len(f) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		out[ppid] = append(out[ppid], pid)
	}
	return out, nil
}

// processCPU reads utime+stime (all threads) from /proc/<pid>/stat.
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("peerbench: cpu time of process %d: %w", pid, err)
	}
	return parseStatCPU(string(b))
}

// statFields returns the fields of /proc/<pid>/stat after the command
// name, starting with the state (field 3). The name is in parentheses and
// may hold spaces and parentheses.
func statFields(stat string) ([]string, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil, fmt.Errorf("malformed stat %q", stat)
	}
	return strings.Fields(stat[i+1:]), nil
}

// parseStatCPU returns utime+stime from the text of /proc/<pid>/stat.
func parseStatCPU(stat string) (time.Duration, error) {
	f, err := statFields(stat)
	if err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time: stat has %d fields after the name, want at least 13", len(f))
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// processRSS reads VmRSS from /proc/<pid>/status, in bytes.
func processRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("peerbench: memory of process %d: %w", pid, err)
	}
	n, err := parseStatusRSS(b)
	if err != nil {
		return 0, fmt.Errorf("peerbench: memory of process %d: %w", pid, err)
	}
	return n, nil
}

// parseStatusRSS returns VmRSS from the text of /proc/<pid>/status, in
// bytes.
func parseStatusRSS(status []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("malformed VmRSS line %q", sc.Text())
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS: %w", err)
		}
		return kb << 10, nil
	}
	return 0, errors.New("no VmRSS line (a zombie or kernel thread?)")
}
