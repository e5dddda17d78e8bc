package kubecluster

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupFS is where the cgroup hierarchies are mounted.
const cgroupFS = "/sys/fs/cgroup"

// daemonsCgroup is the cgroup, under a node's root in the pids hierarchy,
// of the node's containerd (and its shims), kubelet and kube-proxy. The
// containers are in the kubelet's tree beside it, so the whole node is
// the root's subtree.
const daemonsCgroup = "daemons"

// hierarchies returns the folders of the cgroup hierarchies mounted on
// this machine (v1 controllers, the named systemd one, and v2's).
func hierarchies() ([]string, error) {
	entries, err := os.ReadDir(cgroupFS)
	if err != nil {
		return nil, fmt.Errorf("kubecluster: cgroups: %w", err)
	}
	var out []string
	for _, e := range entries {
		p := filepath.Join(cgroupFS, e.Name())
		if fi, err := os.Lstat(p); err != nil || !fi.IsDir() {
			continue // cpu,cpuacct style symbolic links
		}
		if _, err := os.Stat(filepath.Join(p, "cgroup.procs")); err == nil {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("kubecluster: no cgroup hierarchies under %s", cgroupFS)
	}
	return out, nil
}

// createCgroups makes root, and root/daemons in the pids hierarchy, in
// every v1 hierarchy (the kubelet checks that its cgroup root exists in
// each), with the cpuset copied from the parents. It returns the
// daemons' cgroup.procs file.
func createCgroups(root string) (string, error) {
	hs, err := hierarchies()
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(cgroupFS, "pids")); err != nil {
		return "", fmt.Errorf("kubecluster: the pids cgroup controller is not mounted at %s/pids (cgroup v1 or hybrid is expected): %w", cgroupFS, err)
	}
	for _, h := range hs {
		if filepath.Base(h) == "unified" {
			continue
		}
		if err := os.MkdirAll(filepath.Join(h, root), 0o755); err != nil {
			return "", fmt.Errorf("kubecluster: cgroup %s: %w", filepath.Join(h, root), err)
		}
		if filepath.Base(h) == "cpuset" {
			if err := fillCpuset(h, root); err != nil {
				return "", err
			}
		}
	}
	d := filepath.Join(cgroupFS, "pids", root, daemonsCgroup)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", fmt.Errorf("kubecluster: cgroup %s: %w", d, err)
	}
	return filepath.Join(d, "cgroup.procs"), nil
}

// fillCpuset copies cpuset.cpus and cpuset.mems down from the hierarchy's
// root to every level of root: a new v1 cpuset is empty, and nothing can
// join it.
func fillCpuset(h, root string) error {
	parts := strings.Split(strings.Trim(root, "/"), "/")
	for i := range parts {
		dir := filepath.Join(h, filepath.Join(parts[:i+1]...))
		parent := filepath.Dir(dir)
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			cur, _ := os.ReadFile(filepath.Join(dir, f))
			if strings.TrimSpace(string(cur)) != "" {
				continue
			}
			v, err := os.ReadFile(filepath.Join(parent, f))
			if err != nil {
				return fmt.Errorf("kubecluster: cpuset: %w", err)
			}
			if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
				return fmt.Errorf("kubecluster: cpuset %s: %w", filepath.Join(dir, f), err)
			}
		}
	}
	return nil
}

// killCgroups kills every process in the pids subtree of each root (the
// nodes' daemons, shims and containers) until none is left.
func killCgroups(roots []string, log *slog.Logger) error {
	var errs []error
	for _, root := range roots {
		dir := filepath.Join(cgroupFS, "pids", root)
		deadline := time.Now().Add(30 * time.Second)
		for {
			pids := cgroupProcs(dir)
			if len(pids) == 0 {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("kubecluster: processes %v still run in %s 30s after SIGKILL", pids, dir))
				break
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	_ = log
	return errors.Join(errs...)
}

// cgroupProcs lists the processes in the subtree at dir.
func cgroupProcs(dir string) []int {
	var pids []int
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for f := range strings.FieldsSeq(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// removeCgroups removes each root's subtree from every hierarchy, deepest
// first, and then the parents the roots share if they are empty.
func removeCgroups(roots []string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		for _, root := range roots {
			var dirs []string
			_ = filepath.WalkDir(filepath.Join(h, root), func(p string, d fs.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			slices.Reverse(dirs)
			for _, d := range dirs {
				if err := rmdirCgroup(d); err != nil {
					errs = append(errs, err)
				}
			}
		}
		for _, root := range roots {
			// The shared parent (/kubecluster): removed when empty.
			_ = syscall.Rmdir(filepath.Join(h, filepath.Dir(root)))
		}
	}
	return errors.Join(errs...)
}

// rmdirCgroup removes an empty cgroup, retrying while the kernel still
// counts a dying process in it.
func rmdirCgroup(d string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := syscall.Rmdir(d)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("kubecluster: remove cgroup %s: %w", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
