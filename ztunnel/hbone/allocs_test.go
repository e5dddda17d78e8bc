package hbone_test

import (
	"bytes"
	"io"
	"testing"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// TestStreamDataPathAllocations sends 16 KiB through an echoing tunnel and
// reads it back, over and over: in the steady state the data path (the
// client's Write and Read, the server's, both read loops and writers,
// flow control) allocates at most maxAllocs times per round trip, however
// many round trips there are. Buffers come from pools, and an empty
// receive queue keeps its few slots; what allocates (2 per round trip
// when measured) is crypto/tls reading records, not the streams.
func TestStreamDataPathAllocations(t *testing.T) {
	const maxAllocs = 3
	e := newEnv(t, hbone.Tuning{}, nil)
	st, err := e.pool.Connect(t.Context(), e.req(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	out := bytes.Repeat([]byte("x"), 16<<10)
	in := make([]byte, len(out))
	roundTrip := func() {
		if _, err := st.Write(out); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(st, in); err != nil {
			t.Fatal(err)
		}
	}
	for range 100 { // warm the pools and the windows
		roundTrip()
	}
	allocs := testing.AllocsPerRun(500, roundTrip)
	t.Logf("%.2f allocations per 16 KiB round trip", allocs)
	if allocs > maxAllocs {
		t.Errorf("%.2f allocations per 16 KiB round trip through the tunnel, want at most %d", allocs, maxAllocs)
	}
}
