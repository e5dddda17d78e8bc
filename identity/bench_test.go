package identity_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/identity"
)

// TestMain fails the run when tests leave goroutines of this package
// behind (fetches that never end, Run loops that never stop).
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := waitForLeaks(2 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines left behind:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

func waitForLeaks(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "mantlet/identity.") && !strings.Contains(g, "TestMain") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The ztunnel asks for an SVID on every connection: once cached, that
// must cost no allocation.
func TestCachedSVIDDoesNotAllocate(t *testing.T) {
	h := newHarness(t, identity.ManagerOptions{}, false)
	h.svid(t, idA)
	ctx := context.Background()
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := h.m.SVID(ctx, idA); err != nil {
			t.Fatal(err)
		}
		if _, err := h.m.TLSCertificate(ctx, idA); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("SVID + TLSCertificate of a cached identity: %v allocations, want 0", allocs)
	}
}

func BenchmarkCachedSVID(b *testing.B) {
	h := newHarness(b, identity.ManagerOptions{}, false)
	ctx := context.Background()
	if _, err := h.m.SVID(ctx, idA); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := h.m.TLSCertificate(ctx, idA); err != nil {
				b.Fatal(err)
			}
		}
	})
}
