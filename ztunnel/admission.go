package ztunnel

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/shrink"
)

// Admission of accepted connections
//
// Every connection the ztunnel accepts takes a ticket from the admission
// table of its listener before a goroutine is started for it, and gives
// it back when it no longer needs one: an HBONE connection once its TLS
// handshake ended (then its peer is authenticated), inbound plaintext and
// outbound connections when they close. A table bounds the tickets held
// in all (max) and by one source (perSource), and so bounds itself: it
// only holds sources that hold a ticket, at most max of them.
//
// A table that is full refuses the arriving connection: it is the newest.
// The HBONE table (evict set) first looks at who fills it: if some source
// holds at least two tickets more than the arriving connection's source
// would, the newest connection of the source that holds the most is shed
// instead, and the arriving one is admitted. Shedding always takes the
// newest connection, of the heaviest source: a source that keeps few
// handshakes open (a peer ztunnel, a few per pod) is never starved by
// sources that keep many open, however many of those there are, and an
// older handshake, which has had time to make progress, is never cut for
// a newer one of the same weight.

// admitResult says what admit decided.
type admitResult uint8

const (
	admitted     admitResult = iota
	refusedSrc               // the source holds perSource tickets
	refusedFull              // the table holds max tickets
	refusedPress             // the caller's pressure (descriptors) and nothing to shed
)

// ticket is one admitted connection.
type ticket struct {
	table  *admission
	src    *source
	conn   net.Conn       // closed by the table's user when the ticket is shed
	remote netip.AddrPort // the connection's peer
	start  time.Time      // when the connection was accepted

	// Guarded by the table's lock.
	prev, next *ticket // in src's list, oldest first
	state      ticketState
	shedWhy    ResponseFlag // why it was shed, once state is ticketShed
}

type ticketState uint8

const (
	ticketHeld ticketState = iota
	ticketReleased
	ticketShed
)

// source is one source address (an IPv6 source: its /64) and its tickets.
type source struct {
	key          netip.Addr
	n            int
	oldest       *ticket
	newest       *ticket
	prevW, nextW *source // in the table's list of sources holding n tickets
}

// admission is one listener's table. Its methods are safe for concurrent
// use.
type admission struct {
	max, perSource int
	evict          bool

	mu   sync.Mutex
	n    int
	srcs map[netip.Addr]*source // at most n entries
	peak shrink.Peak            // of srcs, so that a flood's memory is given back
	// byWeight[k] lists the sources holding k tickets (evict only); top is
	// the largest k whose list is not empty.
	byWeight []*source
	top      int
}

// newAdmission returns a table of max tickets, perSource of them per
// source (no limit of its own when perSource is 0).
func newAdmission(max, perSource int, evict bool) *admission {
	if perSource <= 0 || perSource > max {
		perSource = max
	}
	// srcs grows as sources come, and shrinks once they left: an agent
	// that is not flooded keeps a few entries, not the 80 KB of a map
	// made for 1,024 (three tables).
	a := &admission{max: max, perSource: perSource, evict: evict, srcs: map[netip.Addr]*source{}}
	if evict {
		a.byWeight = make([]*source, a.perSource+1)
	}
	return a
}

// sourceKey is the unit a per-source limit counts: the IPv4 address, or
// the /64 of an IPv6 address (one host usually owns a whole /64).
func sourceKey(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// admit asks for a ticket for conn, accepted from remote at start. With
// pressure set (the caller is short of descriptors) the table takes no
// more tickets than it holds: it admits only by shedding. It returns the
// ticket, or nil and why not; and a ticket it shed to make room, whose
// connection the caller must close.
func (a *admission) admit(remote netip.AddrPort, conn net.Conn, start time.Time, pressure bool) (t, shed *ticket, why admitResult) {
	key := sourceKey(remote.Addr())
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.srcs[key]
	have := 0
	if s != nil {
		have = s.n
	}
	if have >= a.perSource {
		return nil, nil, refusedSrc
	}
	if full := a.n >= a.max; full || pressure {
		why = refusedPress
		if full {
			why = refusedFull
		}
		// Shed the newest connection of the heaviest source, if that
		// source holds at least two more than this one would hold.
		if !a.evict || a.top < have+2 {
			return nil, nil, why
		}
		heavy := a.byWeight[a.top]
		shed = heavy.newest
		shed.shedWhy = FlagPendingLimit
		if !full {
			shed.shedWhy = FlagDescriptorReserve
		}
		a.removeLocked(shed, ticketShed) // heavy is not s: s holds fewer
	}
	if s == nil {
		s = &source{key: key}
		a.srcs[key] = s
	}
	t = &ticket{src: s, conn: conn, start: start, table: a, remote: remote}
	t.prev = s.newest
	if s.newest != nil {
		s.newest.next = t
	} else {
		s.oldest = t
	}
	s.newest = t
	a.reweighLocked(s, s.n+1)
	a.n++
	return t, shed, admitted
}

// release gives t back; true if t was still held, false if it was shed
// (its connection closed by the table's user) or already released.
func (a *admission) release(t *ticket) bool {
	if t == nil {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if t.state != ticketHeld {
		return false
	}
	a.removeLocked(t, ticketReleased)
	return true
}

// shedReason returns why t was shed, and false if it was not.
func (a *admission) shedReason(t *ticket) (ResponseFlag, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return t.shedWhy, t.state == ticketShed
}

// held returns how many tickets are held.
func (a *admission) held() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.n
}

// sources returns how many sources hold tickets.
func (a *admission) sources() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.srcs)
}

func (a *admission) removeLocked(t *ticket, st ticketState) {
	s := t.src
	if t.prev != nil {
		t.prev.next = t.next
	} else {
		s.oldest = t.next
	}
	if t.next != nil {
		t.next.prev = t.prev
	} else {
		s.newest = t.prev
	}
	t.prev, t.next, t.state = nil, nil, st
	a.n--
	a.reweighLocked(s, s.n-1)
	if s.n == 0 {
		shrink.Delete(&a.srcs, s.key, &a.peak)
	}
}

// reweighLocked sets s's count to n and moves it between the weight
// lists.
func (a *admission) reweighLocked(s *source, n int) {
	if !a.evict {
		s.n = n
		return
	}
	if s.n > 0 { // unlink from byWeight[s.n]
		if s.prevW != nil {
			s.prevW.nextW = s.nextW
		} else {
			a.byWeight[s.n] = s.nextW
		}
		if s.nextW != nil {
			s.nextW.prevW = s.prevW
		}
		s.prevW, s.nextW = nil, nil
	}
	s.n = n
	if n > 0 {
		s.nextW = a.byWeight[n]
		if s.nextW != nil {
			s.nextW.prevW = s
		}
		a.byWeight[n] = s
	}
	if n > a.top {
		a.top = n
	}
	for a.top > 0 && a.byWeight[a.top] == nil {
		a.top--
	}
}
