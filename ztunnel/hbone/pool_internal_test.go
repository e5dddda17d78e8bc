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
	// Later, all three idle: the one idle for the shortest time stays.
	dead := p.reapLocked(now.Add(time.Second))
	if len(kc.conns) != 1 || kc.conns[0] != fresh2 {
		t.Fatalf("kept %d connections (reaped %d), want only the one idle for the shortest time", len(kc.conns), len(dead))
	}
}
