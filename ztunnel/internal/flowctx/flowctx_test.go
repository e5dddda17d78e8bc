package flowctx

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

type key struct{}

func TestCancelEndsTheContextItsChildrenAndHooksOnce(t *testing.T) {
	parent := context.WithValue(context.Background(), key{}, "v")
	c := New(parent)
	child := New(c)
	std, stdCancel := context.WithCancel(c)
	defer stdCancel()
	var runs int
	var h Hook
	c.Register(&h, func() { runs++ })
	if c.Err() != nil || child.Err() != nil || std.Err() != nil {
		t.Fatal("ended before Cancel")
	}
	if got := child.Value(key{}); got != "v" {
		t.Fatalf("value through two Ctxs = %v, want v", got)
	}
	why := errors.New("closed by policy")
	c.Cancel(why)
	c.Cancel(errors.New("again"))
	if runs != 1 {
		t.Fatalf("hook ran %d times, want 1", runs)
	}
	for name, ctx := range map[string]context.Context{"ctx": c, "child": child, "std child": std} {
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("%s not done after Cancel", name)
		}
		if !errors.Is(ctx.Err(), context.Canceled) {
			t.Fatalf("%s: Err = %v, want context.Canceled", name, ctx.Err())
		}
	}
	if Cause(c) != why || Cause(child) != why {
		t.Fatalf("causes %v, %v, want %v", Cause(c), Cause(child), why)
	}
}

func TestAParentsEndReachesItsChildrenWithItsCause(t *testing.T) {
	root, cancel := context.WithCancelCause(context.Background())
	c := New(root)
	child := New(c)
	owned := Owned(root)
	why := errors.New("connection lost")
	cancel(why)
	select {
	case <-child.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("child of a Ctx of a canceled context not done")
	}
	if Cause(child) != why {
		t.Fatalf("cause %v, want %v", Cause(child), why)
	}
	if owned.Err() != nil {
		t.Fatal("an Owned context ended with its parent; it ends only by Cancel")
	}
	if done := New(c); done.Err() == nil {
		t.Fatal("a Ctx made from an ended parent is live")
	}
	var ran bool
	var h Hook
	c.Register(&h, func() { ran = true })
	if !ran {
		t.Fatal("a hook registered on an ended Ctx did not run at once")
	}
}

func TestUnregisteredHooksAndCanceledChildrenLeaveTheParent(t *testing.T) {
	p := New(context.Background())
	var hs [3]Hook
	ran := make([]bool, 3)
	for i := range hs {
		p.Register(&hs[i], func() { ran[i] = true })
	}
	if !p.Unregister(&hs[1]) {
		t.Fatal("Unregister of a registered hook = false")
	}
	if p.Unregister(&hs[1]) {
		t.Fatal("second Unregister = true")
	}
	for range 100 {
		New(p).Cancel(nil)
	}
	n := 0
	for h := p.hooks; h != nil; h = h.next {
		n++
	}
	if n != 2 {
		t.Fatalf("parent holds %d hooks, want the 2 still registered", n)
	}
	p.Cancel(nil)
	if !ran[0] || ran[1] || !ran[2] {
		t.Fatalf("ran = %v, want [true false true]", ran)
	}
	if p.Unregister(&hs[0]) {
		t.Fatal("Unregister after the end = true")
	}
}

func TestConcurrentCancelAndUnregister(t *testing.T) {
	for range 200 {
		p := New(context.Background())
		var h Hook
		var mu sync.Mutex
		runs := 0
		p.Register(&h, func() { mu.Lock(); runs++; mu.Unlock() })
		children := make([]*Ctx, 8)
		for i := range children {
			children[i] = New(p)
		}
		var wg sync.WaitGroup
		var removed bool
		wg.Add(3)
		go func() { defer wg.Done(); p.Cancel(nil) }()
		go func() { defer wg.Done(); removed = p.Unregister(&h) }()
		go func() {
			defer wg.Done()
			for _, c := range children[:4] {
				c.Cancel(nil)
			}
		}()
		wg.Wait()
		if removed == (runs == 1) {
			t.Fatalf("Unregister = %v and the hook ran %d times", removed, runs)
		}
		for _, c := range children {
			if c.Err() == nil {
				t.Fatal("child live after its parent ended")
			}
		}
	}
}

// BenchmarkFlowContext compares the heap a flow's context chain keeps
// while the flow is open: a stream's context, the flow's, and the
// splice's hook on it.
func BenchmarkFlowContext(b *testing.B) {
	conn, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.Run("context", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			st, stCancel := context.WithCancelCause(conn)
			fl, flCancel := context.WithCancel(st)
			stop := context.AfterFunc(fl, func() {})
			stop()
			flCancel()
			stCancel(nil)
		}
	})
	b.Run("flowctx", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			st := Owned(conn)
			fl := New(st)
			var h Hook
			fl.Register(&h, func() {})
			fl.Unregister(&h)
			fl.Cancel(nil)
			st.Cancel(nil)
		}
	})
}

func TestAfterFuncAndWithTimeoutFollowTheCtxWithoutItsDoneChannel(t *testing.T) {
	c := New(context.Background())
	ran := make(chan struct{})
	stop := AfterFunc(c, func() { close(ran) })
	stopped := AfterFunc(c, func() { t.Error("a stopped AfterFunc ran") })
	if !stopped() {
		t.Fatal("stop of a pending AfterFunc = false")
	}
	short, cancelShort := WithTimeout(c, time.Hour)
	defer cancelShort()
	timed, cancelTimed := WithTimeout(c, time.Millisecond)
	defer cancelTimed()
	<-timed.Done()
	if !errors.Is(timed.Err(), context.DeadlineExceeded) {
		t.Fatalf("timed out child: %v, want DeadlineExceeded", timed.Err())
	}
	if c.done != nil {
		t.Fatal("the Ctx made a Done channel for AfterFunc or WithTimeout")
	}
	c.Cancel(nil)
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("AfterFunc did not run when the Ctx ended")
	}
	if stop() {
		t.Fatal("stop after the run = true")
	}
	if !errors.Is(short.Err(), context.Canceled) {
		t.Fatalf("WithTimeout child after its Ctx ended: %v, want Canceled", short.Err())
	}
}
