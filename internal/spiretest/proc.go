package spiretest

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

// process is a SPIRE server or agent, from start until killed.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// launcher starts the processes of one Server from one OS thread that
// lives exactly as long as they should: the parent-death signal they get
// (SIGKILL) comes when the thread that started them exits, and Go ends
// any thread whose goroutine exits while locked to it (the testbed's
// namespace switches do). A thread of our own, locked and parked, ends
// only with close, after the processes were killed, or with the test
// binary.
type launcher struct {
	reqs    chan func()
	stopped chan struct{}
}

func newLauncher() *launcher {
	l := &launcher{reqs: make(chan func()), stopped: make(chan struct{})}
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		defer close(l.stopped)
		for f := range l.reqs {
			f()
		}
	}()
	return l
}

// close ends the launcher's thread.
func (l *launcher) close() {
	close(l.reqs)
	<-l.stopped
}

// command says how to start a process.
type command struct {
	name    string
	netns   string   // a network namespace's path, or empty
	dir     string   // working directory
	logPath string   // its output goes there, appended
	argv    []string // the program and its arguments
}

// start runs c.argv in the network namespace c.netns unless that is empty
// (nsenter enters it and execs the program, so the process stays the one
// started here), in c.dir, with its output appended to c.logPath (a
// restart follows the previous run there).
func (l *launcher) start(c command) (*process, error) {
	argv := c.argv
	if c.netns != "" {
		argv = append([]string{"nsenter", "--net=" + c.netns, "--"}, argv...)
	}
	name, logPath := c.name, c.logPath
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spiretest: %s log: %w", name, err)
	}
	defer log.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = c.dir
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = sysProcAttr()
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	errc := make(chan error, 1)
	l.reqs <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("spiretest: start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// kill kills the process's group and waits until it is gone.
func (p *process) kill() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	if err := killGroup(p.cmd.Process); err != nil {
		select {
		case <-p.exited:
			return nil
		default:
			return fmt.Errorf("spiretest: kill %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
		}
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("spiretest: %s (pid %d) still runs 30s after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// exitError says how the process ended, with the end of its log.
func (p *process) exitError() error {
	<-p.exited
	err := p.waitErr
	if err == nil {
		err = errors.New("exited with status 0")
	}
	return fmt.Errorf("spiretest: %s exited: %w; the end of its log %s:\n%s", p.name, err, p.logPath, p.logTail(40))
}

// logTail returns the last n lines of the process's log.
func (p *process) logTail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimRight(string(bytes.Join(lines, []byte("\n"))), "\n")
}
