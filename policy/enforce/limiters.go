package enforce

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mantlet/mantlet/policy"
)

// limKey names one token bucket: a destination workload and a source
// identity (mTLS) or source IP (plaintext).
type limKey struct {
	dst, id string
	ip      netip.Addr
}

type limEntry struct {
	key        limKey
	lim        *rate.Limiter
	last       time.Time
	prev, next *limEntry
}

// limiters is a bounded LRU of token buckets: at most max entries, each
// dropped after idle without use. A dropped bucket starts full when its
// source returns, which only ever lets that source burst again; the cap is
// what keeps a flood of identities or source addresses from growing
// memory.
type limiters struct {
	mu      sync.Mutex
	m       map[limKey]*limEntry
	head    limEntry // sentinel: head.next is the most recently used
	max     int
	idle    time.Duration
	evicted uint64
}

func newLimiters(max int, idle time.Duration) *limiters {
	l := &limiters{m: make(map[limKey]*limEntry), max: max, idle: idle}
	l.head.next, l.head.prev = &l.head, &l.head
	return l
}

func (l *limiters) unlink(e *limEntry) {
	e.prev.next, e.next.prev = e.next, e.prev
}

func (l *limiters) pushFront(e *limEntry) {
	e.prev, e.next = &l.head, l.head.next
	l.head.next.prev = e
	l.head.next = e
}

func (l *limiters) drop(e *limEntry) {
	l.unlink(e)
	delete(l.m, e.key)
	l.evicted++
}

// allow takes a token from k's bucket, made or adjusted for rl.
func (l *limiters) allow(k limKey, rl policy.RateLimit, now time.Time) bool {
	l.mu.Lock()
	// Expire a few idle buckets from the cold end on every call: the work
	// per call stays bounded and idle buckets do not linger.
	for i := 0; i < 4; i++ {
		e := l.head.prev
		if e == &l.head || now.Sub(e.last) < l.idle {
			break
		}
		l.drop(e)
	}
	limit, burst := rate.Limit(rl.ConnectionsPerSecond), int(rl.Burst)
	if burst <= 0 {
		burst = int(rl.ConnectionsPerSecond)
	}
	e := l.m[k]
	if e == nil {
		if len(l.m) >= l.max {
			l.drop(l.head.prev)
		}
		e = &limEntry{key: k, lim: rate.NewLimiter(limit, burst)}
		l.m[k] = e
	} else {
		l.unlink(e)
		if e.lim.Limit() != limit {
			e.lim.SetLimitAt(now, limit)
		}
		if e.lim.Burst() != burst {
			e.lim.SetBurstAt(now, burst)
		}
	}
	l.pushFront(e)
	e.last = now
	l.mu.Unlock()
	return e.lim.AllowN(now, 1)
}

// len returns the buckets held.
func (l *limiters) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}
