package ztunnel

import (
	"runtime"
	"sync"
)

// A task is work a runner does for a flow: resuming a socket's reads
// (asyncRead), ending a splice (splicer). run returns false if the
// goroutine left the runner meanwhile (runner.leave) and must end once
// run returns.
type task interface {
	run() (worker bool)
}

// runner runs the short tasks of flows on at most max goroutines at once,
// queueing the rest in order. A burst of events (10,000 flows closing at
// once) thus takes a few goroutines, not one each: the runtime never
// frees a goroutine's record (about 480 bytes), so an agent would keep
// its peak count of goroutines for good. A task that must wait for long
// (a write to a peer that may not read) leaves the runner first (leave):
// a flow that waits never holds back the others.
type runner struct {
	max    int
	mu     sync.Mutex
	active int
	q      []task
	head   int
}

// tasks is the runner of every Proxy in the process.
var tasks = &runner{max: max(16, 4*runtime.GOMAXPROCS(0))}

// submit runs t on a goroutine of the runner: at once if one is free,
// after the tasks queued before it otherwise. It never waits.
func (r *runner) submit(t task) {
	r.mu.Lock()
	if r.active < r.max {
		r.active++
		r.mu.Unlock()
		go r.work(t)
		return
	}
	if r.head > 0 && 2*r.head >= len(r.q) {
		// Under steady load the queue may never empty: move what is
		// left to the front rather than let the array grow.
		n := copy(r.q, r.q[r.head:])
		clear(r.q[n:])
		r.q, r.head = r.q[:n], 0
	}
	r.q = append(r.q, t)
	r.mu.Unlock()
}

// work runs t, then the queued tasks, until none is left.
func (r *runner) work(t task) {
	for t != nil {
		if !t.run() {
			return
		}
		r.mu.Lock()
		t = r.popLocked()
		if t == nil {
			r.active--
		}
		r.mu.Unlock()
	}
}

// leave takes the calling worker out of the runner before it waits: the
// next queued task, if any, gets a goroutine of its own in its place.
// The task must then return false from run.
func (r *runner) leave() {
	r.mu.Lock()
	t := r.popLocked()
	if t == nil {
		r.active--
	}
	r.mu.Unlock()
	if t != nil {
		go r.work(t)
	}
}

// popLocked takes the oldest queued task, nil if none. An emptied queue
// lets its array go, so that a burst does not leave it behind.
func (r *runner) popLocked() task {
	if r.head == len(r.q) {
		if cap(r.q) > 64 {
			r.q = nil
		} else {
			r.q = r.q[:0]
		}
		r.head = 0
		return nil
	}
	t := r.q[r.head]
	r.q[r.head] = nil
	r.head++
	return t
}
