//go:build unix

package node

import (
	"errors"
	"fmt"
	"math"
	"os"
	"syscall"
)

// raiseFileLimit raises the soft RLIMIT_NOFILE to the hard limit (Go's
// runtime already raises it to one below at start; raising the hard limit
// would need CAP_SYS_RESOURCE) and returns both.
func raiseFileLimit() (soft, hard int, err error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, 0, fmt.Errorf("open-file limit: %w", err)
	}
	if r.Cur < r.Max {
		want := r
		want.Cur = r.Max
		// The agent starts no processes, so that they inherit the raised
		// limit does not matter.
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
			r = want
		}
	}
	return clampInt(r.Cur), clampInt(r.Max), nil
}

func clampInt(v uint64) int { return int(min(v, math.MaxInt32)) }

// openDescriptors counts the process's open file descriptors.
func openDescriptors() (int, error) {
	for _, dir := range []string{"/proc/self/fd", "/dev/fd"} {
		f, err := os.Open(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("count open descriptors: %w", err)
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return 0, fmt.Errorf("count open descriptors: %w", err)
		}
		return len(names) - 1, nil // not the directory's own
	}
	return 0, errors.New("count open descriptors: neither /proc/self/fd nor /dev/fd")
}
