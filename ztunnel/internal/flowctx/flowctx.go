// Package flowctx is a cancelable context.Context for what a ztunnel
// keeps per flow: an HBONE server stream, a registered flow.
//
// context.WithCancel costs a flow about 500 bytes that it keeps while it
// is open: the context, a map of children in its parent (made for the
// first child, kept at its largest), a Done channel (made as soon as a
// child or an AfterFunc is attached), and an AfterFunc's own context. At
// 10,000 open flows that is 5-10 MB of heap, and what Go keeps after a
// heap has been large (span and GC metadata) grows with it. A Ctx is one
// allocation: its children and its hooks are linked into it (Hook, which
// its user embeds), and its Done channel is made only if asked for.
//
// A Ctx follows the contract of context.Context, and works as the parent
// of standard contexts (context.WithCancel, context.AfterFunc): it has an
// AfterFunc method, which the context package uses instead of a goroutine
// per child. context.Cause does not know a Ctx's cause (it asks the
// nearest standard ancestor): flowctx.Cause does, and a standard child of
// a Ctx ends with context.Canceled as its cause.
package flowctx

import (
	"context"
	"sync"
	"time"
)

// Ctx is a context that ends when Cancel is called, or when its parent
// ends (New; not Owned). Its values and deadline are its parent's.
type Ctx struct {
	parent context.Context
	mu     sync.Mutex
	err    error // nil while live
	cause  error
	done   chan struct{} // made by Done, closed at the end
	hooks  *Hook         // run at the end: a list linked through Hook.next
	// watch is c's hook in up, its parent if a Ctx; unwatch stops the
	// watch of a parent of another kind.
	up      *Ctx
	watch   Hook
	unwatch func() bool
}

// Hook is a function registered with a Ctx (Register), to run once when
// it ends. A Hook is embedded in what registers it, so that registering
// allocates nothing; a Hook is registered with one Ctx at a time.
type Hook struct {
	f          func()
	child      *Ctx // set instead of f for a child Ctx
	owner      *Ctx // the Ctx it is registered with; nil when not
	prev, next *Hook
}

// New returns a context that ends when Cancel is called or when parent
// ends.
func New(parent context.Context) *Ctx {
	c := &Ctx{parent: parent}
	if p, ok := parent.(*Ctx); ok {
		c.up = p
		c.watch.child = c
		p.register(&c.watch)
		return c
	}
	if parent.Done() == nil {
		return c
	}
	c.unwatch = context.AfterFunc(parent, func() {
		c.end(parent.Err(), context.Cause(parent))
	})
	return c
}

// Owned returns a context that takes its values and deadline from parent
// but ends only when Cancel is called: its owner ends it when parent ends
// (an HBONE connection ends each of its streams as it tears down; the
// proxy closes each registered flow as it closes).
func Owned(parent context.Context) *Ctx { return &Ctx{parent: parent} }

// Cancel ends c (if it has not ended) with cause as its Cause
// (context.Canceled when nil), and then runs its hooks and ends its
// children, on the calling goroutine.
func (c *Ctx) Cancel(cause error) {
	c.end(context.Canceled, cause)
	if c.up != nil {
		c.up.Unregister(&c.watch)
	}
	if c.unwatch != nil {
		c.unwatch()
	}
}

// end ends c with err and cause, then runs what was registered.
func (c *Ctx) end(err, cause error) {
	if cause == nil {
		cause = err
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err, c.cause = err, cause
	if c.done != nil {
		close(c.done)
	}
	// Take the hooks off c under its lock, so that Unregister answers
	// false for each from now on.
	var run [4]*Hook
	hooks := run[:0]
	for h := c.hooks; h != nil; {
		next := h.next
		h.owner, h.prev, h.next = nil, nil, nil
		hooks = append(hooks, h)
		h = next
	}
	c.hooks = nil
	c.mu.Unlock()
	for _, h := range hooks {
		if h.child != nil {
			h.child.end(err, cause)
			continue
		}
		h.f()
	}
}

// Register registers h to run f once c ends, on the goroutine that ends
// it (which may hold locks of its own: f must not block, and should start
// a goroutine for anything more than a quick signal); at once if c has
// ended. h must not be registered already.
func (c *Ctx) Register(h *Hook, f func()) {
	h.f, h.child = f, nil
	if !c.register(h) {
		f()
	}
}

// register links h into c's hooks; false when c has ended.
func (c *Ctx) register(h *Hook) bool {
	c.mu.Lock()
	if c.err != nil {
		err, cause := c.err, c.cause
		c.mu.Unlock()
		if h.child != nil {
			h.child.end(err, cause)
			return true
		}
		return false
	}
	h.owner = c
	h.next = c.hooks
	if c.hooks != nil {
		c.hooks.prev = h
	}
	c.hooks = h
	c.mu.Unlock()
	return true
}

// Unregister takes h off c's hooks, and reports whether it did so before
// its function ran: false means that the function ran or is running (c
// ended), or that h was not registered with c.
func (c *Ctx) Unregister(h *Hook) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if h.owner != c {
		return false
	}
	if h.prev != nil {
		h.prev.next = h.next
	} else {
		c.hooks = h.next
	}
	if h.next != nil {
		h.next.prev = h.prev
	}
	h.owner, h.prev, h.next = nil, nil, nil
	return true
}

// AfterFunc arranges for f to be called once c ends, on the goroutine
// that ends it, and returns a function that stops it (see
// context.AfterFunc for the meaning of its result). It is what the
// context package calls to attach a standard child context to c; other
// callers should use context.AfterFunc, which runs f on a goroutine of
// its own.
func (c *Ctx) AfterFunc(f func()) (stop func() bool) {
	h := &Hook{}
	c.Register(h, f)
	return func() bool { return c.Unregister(h) }
}

// Deadline returns the parent's deadline.
func (c *Ctx) Deadline() (time.Time, bool) { return c.parent.Deadline() }

// Value returns the parent's value for key.
func (c *Ctx) Value(key any) any { return c.parent.Value(key) }

// Done returns a channel that is closed when c ends; it is made by the
// first call.
func (c *Ctx) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		if c.err != nil {
			return closed
		}
		c.done = make(chan struct{})
	}
	return c.done
}

// closed is the Done channel of a Ctx that ended before Done was called.
var closed = func() chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}()

// Err returns nil while c is live, then context.Canceled, or its
// parent's error if c ended with its parent.
func (c *Ctx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Cause returns why c ended (the cause given to Cancel, or its parent's
// cause), nil while it is live.
func (c *Ctx) Cause() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cause
}

// Cause returns why ctx ended: ctx's Cause for a *Ctx, context.Cause
// otherwise. (context.Cause does not know a Ctx's cause: it asks the
// nearest standard ancestor.)
func Cause(ctx context.Context) error {
	if c, ok := ctx.(*Ctx); ok {
		return c.Cause()
	}
	return context.Cause(ctx)
}

// AfterFunc is context.AfterFunc (f runs on a goroutine of its own once
// ctx ends; stop stops that), but when ctx is a *Ctx the function is
// linked into it rather than watching its Done channel, which the Ctx
// would then make and keep for the rest of its life.
func AfterFunc(ctx context.Context, f func()) (stop func() bool) {
	c, ok := ctx.(*Ctx)
	if !ok {
		return context.AfterFunc(ctx, f)
	}
	return c.AfterFunc(func() { go f() })
}

// WithTimeout is context.WithTimeout for a child that lives briefly (a
// dial): when parent is a *Ctx, the child is ended through a Hook rather
// than by watching the Ctx's Done channel, which the Ctx would then make
// and keep for the rest of its life. The child's values are parent's;
// it ends with context.Canceled when parent ends.
func WithTimeout(parent context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	c, ok := parent.(*Ctx)
	if !ok {
		return context.WithTimeout(parent, d)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(parent), d)
	h := &Hook{}
	c.Register(h, cancel)
	return ctx, func() {
		c.Unregister(h)
		cancel()
	}
}
