package bpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Layout of a pin directory:
//
//	<PinDir>/<map>                  every map of mantlet.c, pinned by name
//	<PinDir>/links/sk_lookup        the sk_lookup link of the node's netns
//	<PinDir>/links/if<N>-<role>     a TCX link on ifindex N
//	<PinDir>/links/if<N>-<role>-tc  the program of a clsact filter on N
//	                                (fallback when the kernel has no TCX)
//
// bpffs refuses names with a dot.
const (
	linksDir     = "links"
	skLookupPin  = "sk_lookup"
	clsactSuffix = "-tc"
	stagePrefix  = "_stage_"
	configMapPin = "config"
)

// ensureBPFFS checks that dir will live on a bpf filesystem, mounting one
// on /sys/fs/bpf if dir is below it and nothing is mounted there.
func ensureBPFFS(dir string) error {
	probe := dir
	for {
		if _, err := os.Stat(probe); err == nil {
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			break
		}
		probe = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(probe, &st); err != nil {
		return fmt.Errorf("bpf: statfs %s: %w", probe, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	const root = "/sys/fs/bpf"
	if probe != root || !strings.HasPrefix(dir, root+"/") {
		return fmt.Errorf("bpf: pin directory %s is not on a bpf filesystem (mount one: mount -t bpf bpf %s)", dir, root)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpf: mount the bpf filesystem on %s: %w", root, err)
	}
	return nil
}

// lockParent serialises the creation and removal of pin directories under
// one parent; it is held only for the duration of Open or Cleanup.
func lockParent(ctx context.Context, pinDir string) (func(), error) {
	parent := filepath.Dir(pinDir)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return nil, fmt.Errorf("bpf: create %s: %w", parent, err)
	}
	f, err := os.Open(parent)
	if err != nil {
		return nil, fmt.Errorf("bpf: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("bpf: lock %s: %w", parent, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("bpf: wait for the lock on %s: %w", parent, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// lockDir takes the exclusive lock of a pin directory without waiting.
// The lock belongs to the directory's inode, so it survives the rename of
// a staging directory.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("bpf: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, dir)
		}
		return nil, fmt.Errorf("bpf: lock %s: %w", dir, err)
	}
	return f, nil
}

// removeStaleStages removes staging directories that a crashed Open left
// behind. The caller holds the parent lock.
func removeStaleStages(pinDir string, log *slog.Logger) {
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(pinDir), stagePrefix+filepath.Base(pinDir)+"-*"))
	for _, s := range stale {
		f, err := lockDir(s)
		if err != nil {
			continue
		}
		if err := os.RemoveAll(s); err != nil {
			log.Warn("remove stale staging pin dir", "dir", s, "err", err)
		}
		f.Close()
	}
}

// load loads the programs and the maps pinned in dir, creating the maps
// that are not there yet.
func (d *Datapath) load(dir string) error {
	spec, err := loadMantlet()
	if err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("bpf: the maps pinned in %s were made by an incompatible version of mantlet; remove them with the agent's cleanup: %w", dir, err)
	}
	if err != nil {
		return fmt.Errorf("bpf: load the eBPF objects: %w", err)
	}
	return nil
}

// nsInode returns the inode that identifies the network namespace ns
// (links report it as their namespace).
func nsInode(ns netns.NsHandle) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return 0, fmt.Errorf("bpf: stat the network namespace: %w", err)
	}
	return st.Ino, nil
}
