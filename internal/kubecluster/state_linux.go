package kubecluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mantlet/mantlet/internal/proc"
	"github.com/mantlet/mantlet/internal/testbed"
)

// state is what a cluster's state file records: enough for another
// process to remove the cluster.
type state struct {
	Name    string    `json:"name"`
	PID     int       `json:"pid"`
	Dir     string    `json:"dir"`
	Created time.Time `json:"created"`
	// CgroupRoots are the nodes' cgroup roots.
	CgroupRoots []string `json:"cgroupRoots"`
}

func stateFile(dir, name string) string { return filepath.Join(dir, name+".json") }

// claimState creates the state file; a name in use is refused.
func claimState(dir string, st state) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("kubecluster: state folder: %w", err)
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("kubecluster: state: %w", err)
	}
	f, err := os.OpenFile(stateFile(dir, st.Name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("kubecluster: a cluster named %s exists (%s): remove it first", st.Name, stateFile(dir, st.Name))
	}
	if err != nil {
		return fmt.Errorf("kubecluster: state file: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	return errors.Join(err, f.Close())
}

func readState(dir, name string) (state, error) {
	var s state
	b, err := os.ReadFile(stateFile(dir, name))
	if err != nil {
		return s, fmt.Errorf("kubecluster: %w", err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("kubecluster: state file of %s: %w", name, err)
	}
	return s, nil
}

// List returns the names of the clusters recorded in dir (default
// DefaultStateDir), with the PID of the process that made each.
func List(dir string) (map[string]int, error) {
	if dir == "" {
		dir = DefaultStateDir
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("kubecluster: %w", err)
	}
	out := map[string]int{}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		s, err := readState(dir, name)
		if err != nil {
			out[name] = 0
			continue
		}
		out[name] = s.PID
	}
	return out, nil
}

// Down removes the cluster named name that another process made (its
// processes, cgroups, testbed and files), whether or not that process
// still runs.
func Down(name, dir string, log *slog.Logger) error {
	if dir == "" {
		dir = DefaultStateDir
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s, err := readState(dir, name)
	if err != nil {
		return err
	}
	if s.PID != os.Getpid() && proc.Exists(s.PID) {
		// Its owner would keep writing; it dies with its control plane's
		// parent-death signal only if it is ours, so stop it first.
		_ = syscall.Kill(s.PID, syscall.SIGTERM)
		deadline := time.Now().Add(30 * time.Second)
		for proc.Exists(s.PID) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := os.Stat(stateFile(dir, name)); errors.Is(err, fs.ErrNotExist) {
			return nil // its owner removed it
		}
	}
	return errors.Join(killCgroups(s.CgroupRoots, log), removeCluster(s, dir, log))
}

// sweep removes the clusters whose process is gone (a test binary killed
// by its timeout): their control plane died with it, by the parent-death
// signal, but the nodes' containers, cgroups, testbed and files remain.
func sweep(dir string, log *slog.Logger) {
	names, err := List(dir)
	if err != nil {
		return
	}
	for name, pid := range names {
		if pid == 0 || proc.Exists(pid) {
			continue
		}
		log.Info("removing a cluster whose process is gone", "cluster", name, "pid", pid)
		if err := Down(name, dir, log); err != nil {
			log.Warn("could not remove a cluster whose process is gone", "cluster", name, "err", err)
		}
	}
}

// removeCluster removes what is left once the processes are gone: the
// cgroups, the testbed, the files and the state file.
func removeCluster(s state, dir string, log *slog.Logger) error {
	var errs []error
	errs = append(errs, removeCgroups(s.CgroupRoots))
	if err := testbed.Remove(s.Name, testbed.WithLogger(log)); err != nil && !errors.Is(err, fs.ErrNotExist) && !strings.Contains(err.Error(), "no such file") {
		errs = append(errs, err)
	}
	if s.Dir != "" {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, fmt.Errorf("kubecluster: remove %s: %w", s.Dir, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := os.Remove(stateFile(dir, s.Name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("kubecluster: %w", err)
	}
	return nil
}
