// Package proc starts the programs of the test harnesses (etcd,
// kube-apiserver, SPIRE, kubelet, ...) so that they die with the test:
// each in a process group of its own, with its output in a log file, and
// (on Linux) a parent-death signal. Errors name the program; the harness
// adds its own prefix.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Launcher starts processes from one OS thread that lives exactly as long
// as they should. On Linux each process gets a parent-death signal
// (SIGKILL), which the kernel sends when the *thread* that started it
// exits, not the process: and Go ends a thread whenever a goroutine exits
// while locked to it, anywhere in the program (the testbed's namespace
// switches do). A thread of our own, locked and parked, is ended only by
// Close, after the processes were killed (or, if the test binary dies,
// with it).
type Launcher struct {
	reqs    chan func()
	stopped chan struct{}
}

// NewLauncher starts a launcher's thread; Close ends it.
func NewLauncher() *Launcher {
	l := &Launcher{reqs: make(chan func()), stopped: make(chan struct{})}
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		defer close(l.stopped)
		for f := range l.reqs {
			f()
		}
	}()
	return l
}

// Close ends the launcher's thread: every process it started that still
// runs gets its parent-death signal.
func (l *Launcher) Close() {
	close(l.reqs)
	<-l.stopped
}

// Command says how to start a process.
type Command struct {
	Name    string
	Netns   string      // a network namespace's path to run in (through nsenter), or empty
	Dir     string      // working directory, or empty for this one
	LogPath string      // the process's output goes there
	Append  bool        // append to LogPath (a restart follows the previous run); else LogPath must not exist
	LogPerm os.FileMode // LogPath's permissions if created; 0 means 0o600
	Argv    []string    // the program and its arguments
	Env     []string    // the environment; nil means PATH only (etcd reads ETCD_* variables as flags)
	Tail    int         // lines of the log ExitError quotes; 0 means 40
}

// Process is a started process, until it is killed.
type Process struct {
	Name, LogPath string
	cmd           *exec.Cmd
	tail          int
	exited        chan struct{}
	waitErr       error // set before exited is closed
}

// Start runs c.Argv in the network namespace c.Netns unless that is empty
// (nsenter enters it and execs the program, so the process stays the one
// started here).
func (l *Launcher) Start(c Command) (*Process, error) {
	argv := c.Argv
	if c.Netns != "" {
		argv = append([]string{"nsenter", "--net=" + c.Netns, "--"}, argv...)
	}
	flags, perm := os.O_WRONLY|os.O_CREATE|os.O_EXCL, c.LogPerm
	if c.Append {
		flags = os.O_WRONLY | os.O_CREATE | os.O_APPEND
	}
	if perm == 0 {
		perm = 0o600
	}
	log, err := os.OpenFile(c.LogPath, flags, perm)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", c.Name, err)
	}
	defer log.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = c.Dir
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = sysProcAttr()
	cmd.Env = c.Env
	if cmd.Env == nil {
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	}
	errc := make(chan error, 1)
	l.reqs <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("start %s: %w", c.Name, err)
	}
	p := &Process{Name: c.Name, LogPath: c.LogPath, cmd: cmd, tail: c.Tail, exited: make(chan struct{})}
	if p.tail == 0 {
		p.tail = 40
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// Pid is the process's id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited is closed once the process has exited and was reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Running reports whether the process has not exited yet.
func (p *Process) Running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// killTimeout bounds the wait for a killed process to be reaped.
const killTimeout = 30 * time.Second

// Kill kills the process (and its process group) and waits until it is
// gone.
func (p *Process) Kill() error {
	if p.Running() {
		if err := killGroup(p.cmd.Process); err != nil && p.Running() {
			return fmt.Errorf("kill %s (pid %d): %w", p.Name, p.Pid(), err)
		}
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(killTimeout):
		return fmt.Errorf("%s (pid %d) still runs %s after SIGKILL", p.Name, p.Pid(), killTimeout)
	}
}

// ExitError waits until the process has exited and says how it ended,
// with the end of its log.
func (p *Process) ExitError() error {
	<-p.exited
	err := p.waitErr
	if err == nil {
		err = errors.New("exited with status 0")
	}
	return fmt.Errorf("%s exited: %w; the end of its log %s:\n%s", p.Name, err, p.LogPath, p.LogTail(p.tail))
}

// LogTail returns the last n lines of the process's log.
func (p *Process) LogTail(n int) string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimRight(string(bytes.Join(lines, []byte("\n"))), "\n")
}
