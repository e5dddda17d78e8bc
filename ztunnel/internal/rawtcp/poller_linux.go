package rawtcp

import (
	"fmt"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// minSlots is the size below which the slot table is never shrunk.
const minSlots = 1024

// pollEvents is what every Conn registers for, once.
const pollEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// A slot binds an epoll registration to its Conn. gen is unique for every
// use of a slot (a process-wide counter), so an event carrying the index and
// generation of a slot that was since freed, reused or moved finds a
// different generation and is ignored.
type slot struct {
	c   *Conn
	gen uint32
}

// poller is one epoll instance with one goroutine that waits for it in
// Go's network poller (run).
type poller struct {
	epfd int

	mu      sync.Mutex
	slots   []slot  // index = epoll event data; len is the high-water mark
	free    []int32 // indexes of empty slots below len(slots)
	inUse   int
	nextGen uint32
}

var (
	pollOnce sync.Once
	thePoll  *poller
	pollErr  error
)

// getPoller returns the process-wide poller, starting it on first use. It
// never stops, like Go's own network poller.
func getPoller() (*poller, error) {
	pollOnce.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			pollErr = fmt.Errorf("rawtcp: start poller: %w", os.NewSyscallError("epoll_create1", err))
			return
		}
		// Non-blocking, so that os.NewFile hands it to Go's poller (run).
		if err := unix.SetNonblock(epfd, true); err != nil {
			unix.Close(epfd)
			pollErr = fmt.Errorf("rawtcp: start poller: %w", os.NewSyscallError("fcntl", err))
			return
		}
		thePoll = &poller{epfd: epfd}
		go thePoll.run()
	})
	return thePoll, pollErr
}

// eventsOf is what c's registration asks for; the poller's mutex held.
func eventsOf(c *Conn) uint32 {
	if c.noRead {
		return unix.EPOLLOUT | unix.EPOLLET
	}
	return pollEvents
}

// setReadInterest changes c's registration (Conn.SetReadInterest).
func (p *poller) setReadInterest(c *Conn, on bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !c.registered || c.noRead == !on {
		return nil
	}
	c.noRead = !on
	ev := unix.EpollEvent{Events: eventsOf(c), Fd: c.idx, Pad: int32(c.gen)}
	if err := rawEpollCtl(p.epfd, unix.EPOLL_CTL_MOD, c.fd, &ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

// register allocates a slot for c and adds c's socket to the epoll set.
// The caller holds a reference on c (its fd is open).
func (p *poller) register(c *Conn) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var idx int32
	if n := len(p.free); n > 0 {
		idx = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		idx = int32(len(p.slots))
		p.slots = append(p.slots, slot{})
	}
	p.nextGen++
	p.slots[idx] = slot{c: c, gen: p.nextGen}
	ev := unix.EpollEvent{Events: pollEvents, Fd: idx, Pad: int32(p.nextGen)}
	if err := rawEpollCtl(p.epfd, unix.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
		p.slots[idx] = slot{}
		p.free = append(p.free, idx)
		return os.NewSyscallError("epoll_ctl", err)
	}
	c.idx, c.gen = idx, p.nextGen
	c.registered = true
	p.inUse++
	return nil
}

// deregister removes c's socket from the epoll set and frees its slot. The
// caller holds a reference on c (its fd is still open).
func (p *poller) deregister(c *Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !c.registered {
		return
	}
	c.registered = false
	// ENOENT cannot happen while the fd is open and registered; any error
	// leaves nothing to undo: close removes the socket from the set anyway.
	_ = rawEpollCtl(p.epfd, unix.EPOLL_CTL_DEL, c.fd, nil)
	p.slots[c.idx] = slot{}
	p.free = append(p.free, c.idx)
	p.inUse--
	if len(p.slots) > minSlots && p.inUse < len(p.slots)/4 {
		p.shrink()
	}
}

// shrink halves the slot table (at least to minSlots), moving the Conns in
// its upper half into free slots of the lower half: each moved socket is
// re-registered (EPOLL_CTL_MOD) with its new index and a new generation.
// MOD re-checks readiness, so a readiness edge carried by an event already
// read with the old index (and now ignored) is reported again.
func (p *poller) shrink() {
	newLen := max(minSlots, len(p.slots)/2)
	slots := make([]slot, newLen)
	copy(slots, p.slots[:newLen])
	j := 0 // next candidate free index below newLen
	for i := newLen; i < len(p.slots); i++ {
		c := p.slots[i].c
		if c == nil {
			continue
		}
		for slots[j].c != nil {
			j++
		}
		p.nextGen++
		ev := unix.EpollEvent{Events: eventsOf(c), Fd: int32(j), Pad: int32(p.nextGen)}
		if err := rawEpollCtl(p.epfd, unix.EPOLL_CTL_MOD, c.fd, &ev); err != nil {
			// Cannot happen for a registered, open socket; keep the
			// table as it is rather than lose the socket's events.
			slog.Default().Warn("rawtcp: shrink slot table: re-register socket", "err", err)
			return
		}
		slots[j] = slot{c: c, gen: p.nextGen}
		c.idx, c.gen = int32(j), p.nextGen
	}
	free := make([]int32, 0, newLen-p.inUse)
	for i := newLen - 1; i >= 0; i-- {
		if slots[i].c == nil {
			free = append(free, int32(i))
		}
	}
	p.slots, p.free = slots, free
}

// stats reports the slot table's length and the Conns registered (tests).
func (p *poller) stats() (slots, inUse int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.slots), p.inUse
}

// run is the poller goroutine.
func (p *poller) run() {
	// The epoll instance waits in Go's own network poller, as one more
	// descriptor: no thread is held in epoll_wait, and the goroutines its
	// events wake run as those of Go's sockets do. One RawConn.Read for
	// good: its function takes what is ready (epoll_pwait with a zero
	// timeout) and hands it out until less than a full batch came, then
	// returns false to wait for the next edge. Returning from Read would
	// let the next Read's start forget an edge that came meanwhile.
	f := os.NewFile(uintptr(p.epfd), "rawtcp-epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		panic(fmt.Sprintf("rawtcp: poller: %v", err))
	}
	var events [128]unix.EpollEvent
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, err := rawEpollPoll(int(fd), events[:])
			switch {
			case err == unix.EINTR:
				continue
			case err != nil:
				panic(fmt.Sprintf("rawtcp: epoll_pwait: %v", err))
			}
			p.dispatch(events[:n])
			clear(events[:n])
			if n < len(events) {
				return false
			}
		}
	})
	// Only a broken epoll fd gets here; without it no socket of this
	// package can make progress.
	panic(fmt.Sprintf("rawtcp: poller: %v", err))
}

// dispatch tells the Conns of events that they are ready.
func (p *poller) dispatch(events []unix.EpollEvent) {
	const (
		readEvents  = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR
		writeEvents = unix.EPOLLOUT | unix.EPOLLHUP | unix.EPOLLERR
	)
	for i := range events {
		ev := &events[i]
		p.mu.Lock()
		var c *Conn
		if idx := int(ev.Fd); idx < len(p.slots) && p.slots[idx].gen == uint32(ev.Pad) {
			c = p.slots[idx].c
		}
		p.mu.Unlock()
		if c != nil {
			c.ready(ev.Events&readEvents != 0, ev.Events&writeEvents != 0)
		}
	}
}
