package kubetest

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

// process is etcd or kube-apiserver, from start until killed.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// launcher starts the processes of one Server from one OS thread that
// lives exactly as long as they should. On Linux each process gets a
// parent-death signal (SIGKILL), which the kernel sends when the *thread*
// that started it exits, not the process: and Go ends a thread whenever a
// goroutine exits while locked to it, anywhere in the program. A thread of
// our own, locked and parked, is ended only by close, after the processes
// were killed (or, if the test binary dies, with it).
type launcher struct {
	reqs    chan func()
	stopped chan struct{}
}

func newLauncher() *launcher {
	l := &launcher{reqs: make(chan func()), stopped: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread exits with this goroutine, and any
		// process still running gets its parent-death signal.
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

// start runs bin with args, in the network namespace at netns unless that
// is empty (through nsenter, which enters it and execs bin, so the process
// is still the one started here), in dir, with its output in logPath.
func (l *launcher) start(name, netns, dir, logPath, bin string, args ...string) (*process, error) {
	argv := append([]string{bin}, args...)
	if netns != "" {
		argv = append([]string{"nsenter", "--net=" + netns, "--"}, argv...)
	}
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kubetest: %s log: %w", name, err)
	}
	defer log.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = sysProcAttr()
	// A minimal environment: etcd reads ETCD_* variables as flags, and
	// neither needs anything else.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	errc := make(chan error, 1)
	l.reqs <- func() { errc <- cmd.Start() }
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("kubetest: start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// running reports whether the process has not exited yet.
func (p *process) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// killTimeout bounds the wait for a killed process to be reaped.
const killTimeout = 30 * time.Second

// kill kills the process (and its process group) and waits until it is
// gone.
func (p *process) kill() error {
	if p.running() {
		if err := killGroup(p.cmd.Process); err != nil && p.running() {
			return fmt.Errorf("kubetest: kill %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
		}
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(killTimeout):
		return fmt.Errorf("kubetest: %s (pid %d) still runs %s after SIGKILL", p.name, p.cmd.Process.Pid, killTimeout)
	}
}

// exitError says how the process ended, with the end of its log.
func (p *process) exitError() error {
	<-p.exited
	err := p.waitErr
	if err == nil {
		err = errors.New("exited with status 0")
	}
	return fmt.Errorf("kubetest: %s exited: %w; the end of its log %s:\n%s", p.name, err, p.logPath, p.logTail(40))
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
