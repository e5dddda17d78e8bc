package kubecluster

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// process is one program of the cluster, from start until killed.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// launcher starts the cluster's programs from one locked OS thread that
// lives as long as the cluster: each program gets a parent-death signal,
// which the kernel sends when the thread that started it exits (and Go
// ends a thread whenever a goroutine locked to it exits). So they die
// with the process that made the cluster, even if it is killed.
type launcher struct {
	reqs    chan func()
	stopped chan struct{}
}

func newLauncher() *launcher {
	l := &launcher{reqs: make(chan func()), stopped: make(chan struct{})}
	go func() {
		runtime.LockOSThread() // never unlocked: see launcher
		defer close(l.stopped)
		for f := range l.reqs {
			f()
		}
	}()
	return l
}

func (l *launcher) close() {
	close(l.reqs)
	<-l.stopped
}

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
func (l *launcher) start(spec procSpec) (*process, error) {
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
	log, err := os.OpenFile(spec.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kubecluster: %s log: %w", spec.name, err)
	}
	defer log.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, spec.env...)
	errc := make(chan error, 1)
	l.reqs <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("kubecluster: start %s: %w", spec.name, err)
	}
	p := &process{name: spec.name, cmd: cmd, logPath: spec.log, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *process) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill kills the process's group and waits until it is reaped.
func (p *process) kill() error {
	if p.running() {
		if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL); err != nil && p.running() {
			return fmt.Errorf("kubecluster: kill %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
		}
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("kubecluster: %s (pid %d) still runs 30s after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// exitError says how the process ended, with the end of its log.
func (p *process) exitError() error {
	<-p.exited
	err := p.waitErr
	if err == nil {
		err = errors.New("exited with status 0")
	}
	return fmt.Errorf("kubecluster: %s exited: %w; the end of its log %s:\n%s", p.name, err, p.logPath, logTail(p.logPath, 30))
}

// logTail returns the last n lines of a file.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimRight(string(bytes.Join(lines, []byte("\n"))), "\n")
}
