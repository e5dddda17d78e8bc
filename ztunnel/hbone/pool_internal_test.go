package hbone

import (
	"testing"
	"time"
)

// The reaper may look at the pool with a time taken before a stream
// ended (a tick read late under load): a connection that became idle
// after that time is idle for no time at all, not dead. It once counted
// as dead, and the pool closed every connection of a burst at once.
func TestReapDoesNotCloseConnectionsIdleSinceAfterNow(t *testing.T) {
	now := time.Now()
	tune := Tuning{SpareIdleTimeout: 200 * time.Millisecond, IdleTimeout: time.Minute}.WithDefaults()
	p := &Pool{t: tune, keys: make(map[poolKey]*keyConns)}
	conn := func(idleAt time.Time) *poolConn {
		return &poolConn{hc: &h2conn{cl: clientState{idleAt: idleAt, retireAt: now.Add(time.Hour)}}}
	}
	spare, fresh1, fresh2 := conn(now.Add(-time.Second)), conn(now.Add(10*time.Millisecond)), conn(now.Add(20*time.Millisecond))
	kc := &keyConns{conns: []*poolConn{spare, fresh1, fresh2}}
	p.keys[poolKey{}] = kc
	for _, c := range p.reapLocked(now) {
		if c != spare {
			t.Fatal("the reaper closed a connection whose stream ended after the time it was given")
		}
	}
	// Later, all three idle: the oldest stays.
	dead := p.reapLocked(now.Add(time.Second))
	if len(kc.conns) != 1 || kc.conns[0] != spare {
		t.Fatalf("kept %d connections (reaped %d), want only the oldest", len(kc.conns), len(dead))
	}
}

// Of a key's idle connections the oldest stays, so that a burst's newer
// connections go, and their memory with them; but not one idle for half
// of IdleTimeout or more, which the server is about to close: then the
// one idle for the shortest time stays.
func TestReapKeepsTheOldestIdleConnectionTheServerKeepsToo(t *testing.T) {
	now := time.Now()
	tune := Tuning{SpareIdleTimeout: 200 * time.Millisecond, IdleTimeout: time.Minute}.WithDefaults()
	conn := func(idleAt time.Time) *poolConn {
		return &poolConn{hc: &h2conn{cl: clientState{idleAt: idleAt, retireAt: now.Add(time.Hour)}}}
	}
	for _, c := range []struct {
		name string
		idle []time.Duration // oldest first
		kept int
	}{
		{"a burst's connections after the first", []time.Duration{time.Second, 2 * time.Second, time.Second}, 0},
		{"the oldest idle for half of IdleTimeout", []time.Duration{30 * time.Second, 2 * time.Second, time.Second, 3 * time.Second}, 1},
		{"every one idle for half of IdleTimeout", []time.Duration{40 * time.Second, 31 * time.Second, 35 * time.Second}, 1},
	} {
		p := &Pool{t: tune, keys: make(map[poolKey]*keyConns)}
		var conns []*poolConn
		for _, d := range c.idle {
			conns = append(conns, conn(now.Add(-d)))
		}
		kc := &keyConns{conns: append([]*poolConn(nil), conns...)}
		p.keys[poolKey{}] = kc
		dead := p.reapLocked(now)
		if len(kc.conns) != 1 || kc.conns[0] != conns[c.kept] || len(dead) != len(conns)-1 {
			t.Errorf("%s: kept %d connections (reaped %d), want only connection %d", c.name, len(kc.conns), len(dead), c.kept)
		}
	}
}
