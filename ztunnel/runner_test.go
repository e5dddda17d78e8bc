package ztunnel

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// blockingTask runs until released, counting how many run at once.
type blockingTask struct {
	running, peak *atomic.Int32
	release       chan struct{}
	leave         bool // leaves the runner before it waits
	r             *runner
	done          *sync.WaitGroup
}

func (b *blockingTask) run() bool {
	defer b.done.Done()
	if b.leave {
		b.r.leave()
		<-b.release
		return false
	}
	n := b.running.Add(1)
	for {
		p := b.peak.Load()
		if n <= p || b.peak.CompareAndSwap(p, n) {
			break
		}
	}
	<-b.release
	b.running.Add(-1)
	return true
}

// A burst of tasks runs on at most max goroutines; the rest wait their
// turn and all of them run.
func TestRunnerBoundsItsGoroutines(t *testing.T) {
	r := &runner{max: 4}
	var running, peak atomic.Int32
	var wg sync.WaitGroup
	release := make(chan struct{})
	const n = 100
	wg.Add(n)
	for range n {
		r.submit(&blockingTask{running: &running, peak: &peak, release: release, done: &wg})
	}
	for deadline := time.Now().Add(10 * time.Second); running.Load() < 4; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d tasks run at once, want 4 (the runner's max)", running.Load())
		}
	}
	close(release)
	wg.Wait()
	if got := peak.Load(); got != 4 {
		t.Fatalf("at most %d tasks ran at once, want 4", got)
	}
	// The workers end once they find the queue empty.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		active, queued, c := r.active, len(r.q)-r.head, cap(r.q)
		r.mu.Unlock()
		if active == 0 && c == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the burst: %d workers, queue of %d (cap %d), want none and its array let go", active, queued, c)
		}
	}
}

// A task that leaves the runner before it waits gives its place to the
// next queued task: waiting tasks never hold the others back.
func TestRunnerTaskThatLeavesFreesItsPlace(t *testing.T) {
	r := &runner{max: 1}
	var running, peak atomic.Int32
	var wg sync.WaitGroup
	wait := make(chan struct{})
	defer wg.Wait()
	defer close(wait)
	wg.Add(1)
	r.submit(&blockingTask{running: &running, peak: &peak, release: wait, leave: true, r: r, done: &wg})
	ran := make(chan struct{})
	r.submit(taskFunc(func() { close(ran) }))
	select {
	case <-ran:
	case <-time.After(10 * time.Second):
		t.Fatal("the queued task did not run while the first one waited outside the runner")
	}
}

type taskFunc func()

func (f taskFunc) run() bool {
	f()
	return true
}
