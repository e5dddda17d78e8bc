package ztunnel

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// checkTable verifies the table's bookkeeping: the counts add up, only
// sources holding tickets are kept, each ticket list and weight list is
// consistent, and top is the heaviest weight.
func checkTable(t *testing.T, a *admission) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	sum, heaviest := 0, 0
	for key, s := range a.srcs {
		if s.key != key || s.n <= 0 {
			t.Fatalf("source %s is kept with %d tickets", key, s.n)
		}
		n := 0
		var prev *ticket
		for x := s.oldest; x != nil; x = x.next {
			if x.prev != prev || x.src != s || x.state != ticketHeld {
				t.Fatalf("ticket list of %s is broken", key)
			}
			prev = x
			n++
		}
		if prev != s.newest || n != s.n {
			t.Fatalf("source %s counts %d tickets, lists %d", key, s.n, n)
		}
		sum += n
		heaviest = max(heaviest, n)
	}
	if sum != a.n {
		t.Fatalf("table counts %d tickets, sources hold %d", a.n, sum)
	}
	if len(a.srcs) > a.n || a.n > a.max {
		t.Fatalf("%d sources for %d tickets (max %d)", len(a.srcs), a.n, a.max)
	}
	if !a.evict {
		return
	}
	if a.top != heaviest {
		t.Fatalf("top = %d, heaviest source holds %d", a.top, heaviest)
	}
	listed := 0
	for w, s := range a.byWeight {
		var prev *source
		for ; s != nil; s = s.nextW {
			if s.n != w || s.prevW != prev || a.srcs[s.key] != s {
				t.Fatalf("weight list %d is broken at %s (holds %d)", w, s.key, s.n)
			}
			prev = s
			listed++
		}
	}
	if listed != len(a.srcs) {
		t.Fatalf("weight lists hold %d sources, the table %d", listed, len(a.srcs))
	}
}

func TestAdmissionRefusesTheNewestOfASourceAtItsLimit(t *testing.T) {
	a := newAdmission(10, 2, true)
	now := time.Now()
	for i, want := range []admitResult{admitted, admitted, refusedSrc, refusedSrc} {
		tk, shed, why := a.admit(ap(fmt.Sprintf("192.0.2.1:%d", 1000+i)), nil, now, false)
		if why != want || shed != nil || (tk != nil) != (want == admitted) {
			t.Fatalf("connection %d: %v, shed %v; want %v", i, why, shed, want)
		}
	}
	if tk, _, why := a.admit(ap("192.0.2.2:1000"), nil, now, false); why != admitted || tk == nil {
		t.Fatalf("another source: %v, want admitted", why)
	}
	checkTable(t, a)
}

func TestAdmissionShedsTheNewestOfTheHeaviestSourceForALighterOne(t *testing.T) {
	a := newAdmission(6, 6, true)
	now := time.Now()
	var heavy []*ticket
	for i := range 4 {
		tk, _, _ := a.admit(ap(fmt.Sprintf("192.0.2.1:%d", i+1)), nil, now.Add(time.Duration(i)), false)
		heavy = append(heavy, tk)
	}
	for i := range 2 {
		a.admit(ap(fmt.Sprintf("192.0.2.2:%d", i+1)), nil, now, false)
	}
	checkTable(t, a)

	// Full. A new source sheds the newest ticket of the heaviest.
	tk, shed, why := a.admit(ap("192.0.2.3:1"), nil, now, false)
	if why != admitted || tk == nil || shed != heavy[3] {
		t.Fatalf("new source: %v, shed %p; want admitted, shedding the heavy source's newest %p", why, shed, heavy[3])
	}
	if flag, ok := a.shedReason(shed); !ok || flag != FlagPendingLimit {
		t.Fatalf("shed reason = %v, %v; want pending_limit", flag, ok)
	}
	if a.release(shed) {
		t.Fatal("release of a shed ticket says it was held")
	}
	checkTable(t, a)

	// 192.0.2.1 holds 3 now, 192.0.2.2 holds 2: one more from 192.0.2.2
	// would make them 3 and 3, no fairer: it is refused.
	if tk, shed, why := a.admit(ap("192.0.2.2:9"), nil, now, false); tk != nil || shed != nil || why != refusedFull {
		t.Fatalf("second source at the heaviest's weight minus one: %v, shed %v; want refused (full)", why, shed)
	}
	// So is one more from the heaviest.
	if tk, _, why := a.admit(ap("192.0.2.1:9"), nil, now, false); tk != nil || why != refusedFull {
		t.Fatalf("heaviest source: %v; want refused (full)", why)
	}
	// A fourth source sheds 192.0.2.1's newest again.
	if _, shed, _ := a.admit(ap("192.0.2.4:1"), nil, now, false); shed != heavy[2] {
		t.Fatalf("shed %p, want %p (the heaviest's newest)", shed, heavy[2])
	}
	// Sources hold 2, 2, 1, 1. Two new sources still take a ticket each
	// from a source holding two; then all six hold one, and a seventh is
	// refused.
	for i, src := range []string{"192.0.2.5:1", "192.0.2.6:1"} {
		if tk, shed, why := a.admit(ap(src), nil, now, false); tk == nil || shed == nil || why != admitted {
			t.Fatalf("new source %d: %v, shed %v; want admitted by shedding", i, why, shed)
		}
	}
	if tk, shed, why := a.admit(ap("192.0.2.7:1"), nil, now, false); tk != nil || shed != nil || why != refusedFull {
		t.Fatalf("a table of six sources holding one each: %v, shed %v; want refused", why, shed)
	}
	checkTable(t, a)
	if !a.release(heavy[0]) || a.held() != 5 {
		t.Fatalf("release of the oldest ticket: %d held, want 5", a.held())
	}
	checkTable(t, a)
}

func TestAdmissionUnderPressureOnlyTradesTickets(t *testing.T) {
	a := newAdmission(100, 100, true)
	now := time.Now()
	for i := range 5 {
		a.admit(ap(fmt.Sprintf("192.0.2.1:%d", i+1)), nil, now, false)
	}
	tk, shed, why := a.admit(ap("192.0.2.2:1"), nil, now, true)
	if tk == nil || shed == nil || why != admitted || a.held() != 5 {
		t.Fatalf("under pressure: %v, shed %v, %d held; want one traded for another, 5 held", why, shed, a.held())
	}
	if flag, _ := a.shedReason(shed); flag != FlagDescriptorReserve {
		t.Fatalf("shed for %v, want fd_reserve", flag)
	}
	if tk, _, why := a.admit(ap("192.0.2.1:9"), nil, now, true); tk != nil || why != refusedPress {
		t.Fatalf("heaviest source under pressure: %v; want refused (pressure)", why)
	}
	if tk, _, why := newAdmission(100, 100, false).admit(ap("192.0.2.1:1"), nil, now, true); tk != nil || why != refusedPress {
		t.Fatalf("empty table under pressure: %v; want refused", why)
	}
	checkTable(t, a)
}

func TestAdmissionWithoutEvictionNeverSheds(t *testing.T) {
	a := newAdmission(3, 3, false)
	now := time.Now()
	for i := range 3 {
		a.admit(ap(fmt.Sprintf("192.0.2.1:%d", i+1)), nil, now, false)
	}
	if tk, shed, why := a.admit(ap("192.0.2.2:1"), nil, now, false); tk != nil || shed != nil || why != refusedFull {
		t.Fatalf("full table: %v, shed %v; want refused", why, shed)
	}
	checkTable(t, a)
}

func TestAdmissionCountsAnIPv6SourceByItsSlash64(t *testing.T) {
	a := newAdmission(10, 2, true)
	now := time.Now()
	for i, src := range []string{"[2001:db8:1:2::1]:1", "[2001:db8:1:2:ffff::9]:1", "[2001:db8:1:2::77]:1"} {
		_, _, why := a.admit(ap(src), nil, now, false)
		if want := map[bool]admitResult{true: admitted, false: refusedSrc}[i < 2]; why != want {
			t.Fatalf("%s: %v, want %v", src, why, want)
		}
	}
	if _, _, why := a.admit(ap("[2001:db8:1:3::1]:1"), nil, now, false); why != admitted {
		t.Fatalf("another /64: %v, want admitted", why)
	}
	if _, _, why := a.admit(ap("[::ffff:192.0.2.1]:1"), nil, now, false); why != admitted || a.sources() != 3 {
		t.Fatalf("IPv4-mapped source: %v, %d sources; want admitted as its IPv4 address", why, a.sources())
	}
	checkTable(t, a)
}

// TestAdmissionStaysConsistentAndBounded admits, releases and sheds at
// random and checks the bookkeeping after every step: whatever the
// traffic, the table holds at most max tickets and only sources that hold
// one, and a source that asks while the table is full is never refused
// while another holds two more than it would.
func TestAdmissionStaysConsistentAndBounded(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	a := newAdmission(64, 16, true)
	var held []*ticket
	now := time.Now()
	for step := range 20000 {
		if len(held) > 0 && r.IntN(3) == 0 {
			i := r.IntN(len(held))
			a.release(held[i])
			held[i] = held[len(held)-1]
			held = held[:len(held)-1]
		} else {
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(r.IntN(4)), byte(r.IntN(40))}), 1)
			a.mu.Lock()
			have, top := 0, a.top
			if s := a.srcs[sourceKey(src.Addr())]; s != nil {
				have = s.n
			}
			full := a.n >= a.max
			a.mu.Unlock()
			tk, shed, why := a.admit(src, nil, now, r.IntN(10) == 0)
			if tk != nil {
				held = append(held, tk)
			}
			if why == refusedFull && have < a.perSource && top >= have+2 {
				t.Fatalf("step %d: refused %s (holds %d) while a source holds %d", step, src, have, top)
			}
			if shed != nil && !full && why == admitted && a.held() > len(held) {
				t.Fatalf("step %d: shedding grew the table", step)
			}
		}
		// Drop shed tickets from the test's list.
		kept := held[:0]
		for _, tk := range held {
			if _, shed := a.shedReason(tk); !shed {
				kept = append(kept, tk)
			}
		}
		held = kept
		if step%97 == 0 {
			checkTable(t, a)
		}
		if a.held() != len(held) {
			t.Fatalf("step %d: table holds %d, test holds %d", step, a.held(), len(held))
		}
	}
	checkTable(t, a)
}

func BenchmarkAdmission(b *testing.B) {
	a := newAdmission(4096, 128, true)
	srcs := make([]netip.AddrPort, 1024)
	for i := range srcs {
		srcs[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 1)
	}
	now := time.Now()
	ring := make([]*ticket, 2048)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if tk := ring[i%len(ring)]; tk != nil {
			a.release(tk)
		}
		ring[i%len(ring)], _, _ = a.admit(srcs[i%len(srcs)], nil, now, false)
	}
}
