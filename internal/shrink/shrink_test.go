package shrink

import (
	"runtime"
	"testing"
)

// heap is the live heap after a full collection.
func heap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestDeleteGivesBackTheMemoryOfAPeak: a map that held 10,000 entries
// and was emptied keeps nothing of them (it is made anew when it empties;
// before, the last copy kept the table of 625 entries, ~40 KiB), where
// the built-in delete keeps them all.
func TestDeleteGivesBackTheMemoryOfAPeak(t *testing.T) {
	const n = 10_000
	for _, c := range []struct {
		name  string
		del   func(m *map[uint64]*[64]byte, k uint64, p *Peak)
		maxKB uint64
		minKB uint64
	}{
		{"shrink.Delete", Delete[map[uint64]*[64]byte], 8, 0},
		{"the built-in delete (the memory stays)", func(m *map[uint64]*[64]byte, k uint64, _ *Peak) { delete(*m, k) }, 1 << 20, 200},
	} {
		before := heap()
		m := map[uint64]*[64]byte{}
		var p Peak
		for i := range uint64(n) {
			m[i] = new([64]byte)
		}
		for i := range uint64(n) {
			c.del(&m, i, &p)
		}
		kept := (max(heap(), before) - before) >> 10
		t.Logf("%s: %d KiB kept", c.name, kept)
		if kept > c.maxKB || kept < c.minKB {
			t.Errorf("%s: %d KiB kept after %d entries came and went, want %d to %d", c.name, kept, n, c.minKB, c.maxKB)
		}
		runtime.KeepAlive(m)
	}
}

// TestDeleteKeepsWhatRemains: shrinking changes where entries live, never
// which; small maps are left alone.
func TestDeleteKeepsWhatRemains(t *testing.T) {
	m := map[int]int{}
	p := Peak{Min: 8}
	for i := range 100 {
		m[i] = i * 2
	}
	for i := range 90 {
		Delete(&m, i, &p)
		if len(m) != 99-i {
			t.Fatalf("after deleting %d: %d entries, want %d", i+1, len(m), 99-i)
		}
	}
	for i := 90; i < 100; i++ {
		if m[i] != i*2 {
			t.Errorf("m[%d] = %d, want %d", i, m[i], i*2)
		}
	}
	if p.n > 25 {
		t.Errorf("peak %d after shrinking to 10 entries, want it restarted", p.n)
	}
	small := map[int]int{1: 1, 2: 2}
	orig := small
	var q Peak
	Delete(&small, 1, &q)
	small[3] = 3 // the map was not replaced below Min: orig sees it
	if orig[3] != 3 {
		t.Error("a map smaller than Min was copied")
	}
}
