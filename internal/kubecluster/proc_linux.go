package kubecluster

import (
	"fmt"

	"github.com/mantlet/mantlet/internal/proc"
)

// launcher starts the cluster's programs from one locked OS thread that
// lives as long as the cluster (see proc.Launcher): each program gets a
// parent-death signal, so they die with the process that made the
// cluster, even if it is killed.
type launcher struct{ *proc.Launcher }

// procSpec says how to start a program.
type procSpec struct {
	name string
	// netns is the network namespace to run in ("" for this one).
	netns string
	// cgroup, if set, is a cgroup.procs file the program joins before it
	// starts (so that everything it forks is found there).
	cgroup string
	// newMountNS gives the program a mount namespace of its own, a slave
	// of this one, where setup runs (a shell script) before the program.
	newMountNS bool
	setup      string
	// mountNS is a mount namespace to join instead ("/proc/<pid>/ns/mnt").
	mountNS string
	log     string
	argv    []string
	env     []string
}

// start runs a program as spec says: through sh (to join the cgroup and
// run the setup), nsenter (the network and mount namespaces) and unshare
// (a new mount namespace), each of which execs the next, so the program
// keeps the process started here, its parent-death signal and its
// process group.
func (l launcher) start(spec procSpec) (*proc.Process, error) {
	argv := spec.argv
	if spec.newMountNS {
		script := "set -e\n" + spec.setup + "\nexec \"$@\""
		argv = append([]string{"unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script, spec.name}, argv...)
	}
	if spec.netns != "" || spec.mountNS != "" {
		ns := []string{"nsenter"}
		if spec.netns != "" {
			ns = append(ns, "--net="+spec.netns)
		}
		if spec.mountNS != "" {
			ns = append(ns, "--mount="+spec.mountNS)
		}
		argv = append(append(ns, "--"), argv...)
	}
	if spec.cgroup != "" {
		argv = append([]string{"sh", "-c", `echo $$ > "$0" && exec "$@"`, spec.cgroup}, argv...)
	}
	p, err := l.Start(proc.Command{Name: spec.name, LogPath: spec.log, Append: true, LogPerm: 0o644, Argv: argv, Tail: 30,
		Env: append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, spec.env...)})
	return p, wrap(err)
}

// wrap says that err comes from kubecluster; nil stays nil.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("kubecluster: %w", err)
}
