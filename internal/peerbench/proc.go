package peerbench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mantlet/mantlet/internal/testbed"
)

// stopTimeout is how long a peer or app process has between SIGTERM and
// SIGKILL.
const stopTimeout = 5 * time.Second

// readyTimeout bounds how long a started process has to accept
// connections.
const readyTimeout = 30 * time.Second

// proc is a process the bench started inside a pod: an app server or one
// side of a peer pair.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *tail
	done chan struct{} // closed when the process exited; then err is set
	err  error
	// throughputOnly marks a peer process that only carries iperf3's
	// connections (see side.throughputOnly).
	throughputOnly bool
}

// startProc runs name in pod's network namespace, in a process group of its
// own (stop kills the whole group, nginx's workers too), killed if the
// bench dies.
func startProc(pod *testbed.Pod, what, name string, args ...string) (*proc, error) {
	// The process outlives the call; stop ends it.
	cmd := pod.Command(context.Background(), name, args...)
	p := &proc{name: what, cmd: cmd, out: &tail{max: 64 << 10}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("peerbench: start %s: %w", what, err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitListening waits until addr accepts connections from pod, or the
// process exits.
func (p *proc) waitListening(ctx context.Context, pod *testbed.Pod, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	for {
		if p.exited() {
			return fmt.Errorf("peerbench: %s exited (%v) before it listened on %s; its output:\n%s", p.name, p.err, addr, p.out.String())
		}
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		c, err := pod.Dial(dctx, "tcp4", addr)
		dcancel()
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("peerbench: %s does not listen on %s: %w; its output:\n%s", p.name, addr, errors.Join(err, ctx.Err()), p.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop sends SIGTERM to the process group, and SIGKILL after stopTimeout.
// It returns an error only when the group had to be killed.
func (p *proc) stop() error {
	pgid := p.cmd.Process.Pid
	if !p.exited() {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
	}
	var err error
	select {
	case <-p.done:
	case <-time.After(stopTimeout):
		err = fmt.Errorf("peerbench: %s did not exit within %v of SIGTERM; killed", p.name, stopTimeout)
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
	// Children that outlived the leader (nginx's workers) go with the group.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return err
}

// stopAll stops every process and returns the errors.
func stopAll(procs []*proc) error {
	errs := make([]error, len(procs))
	var wg sync.WaitGroup
	for i, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = p.stop() }()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0:0], t.b[len(t.b)-t.max/2:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(bytes.ToValidUTF8(t.b, nil)))
}

// hostPort joins an IP string and a port.
func hostPort(ip string, port int) string { return net.JoinHostPort(ip, fmt.Sprint(port)) }
