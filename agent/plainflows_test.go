package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// fakePlaintext records ClosePlaintext calls; each ends one connection,
// and fail makes that many calls fail after ending it.
type fakePlaintext struct {
	mu    sync.Mutex
	calls []string
	fail  int
}

func (f *fakePlaintext) ClosePlaintext(_ context.Context, ifindex int, podIPs []netip.Addr) ([]netip.AddrPort, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf("%d:%v", ifindex, podIPs))
	peer := []netip.AddrPort{netip.MustParseAddrPort("198.19.1.9:40000")}
	if f.fail > 0 {
		f.fail--
		return peer, errors.New("inet_diag: permission denied")
	}
	return peer, nil
}

func (f *fakePlaintext) took() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.calls
	f.calls = nil
	return out
}

func TestAgentClosesPlaintextWhenAPodTurnsStrict(t *testing.T) {
	var mu sync.Mutex
	modes := map[string]v1alpha1.MTLSMode{"shop/a": v1alpha1.MTLSPermissive}
	setMode := func(uid string, m v1alpha1.MTLSMode) {
		mu.Lock()
		defer mu.Unlock()
		modes[uid] = m
	}
	closer := &fakePlaintext{}
	a, err := New(Config{Node: "node-1", Datapath: newFakeDatapath(), Plaintext: closer, Store: workload.NewStore(),
		Links: &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101, netip.MustParseAddr("198.19.1.2"): 102}},
		MTLSMode: func(w *workload.Workload) v1alpha1.MTLSMode {
			mu.Lock()
			defer mu.Unlock()
			return modes[w.UID]
		},
		RetryMin: time.Second, RetryMax: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	st := state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}, pod{"shop/b", "node-1", "198.19.1.2", "", true})
	now := time.Now()
	for _, step := range []struct {
		name   string
		do     func()
		after  time.Duration // since the previous step
		want   []string
		closed uint64
	}{
		{"a PERMISSIVE pod keeps its connections", func() { setMode("shop/b", v1alpha1.MTLSPermissive) }, 0, nil, 0},
		{"a pod that turns STRICT loses its plaintext", func() { setMode("shop/a", v1alpha1.MTLSStrict) }, 0, []string{"101:[198.19.1.1]"}, 1},
		{"once", func() {}, 0, nil, 1},
		{"a failure is counted and retried with backoff", func() {
			closer.fail = 1
			setMode("shop/b", v1alpha1.MTLSStrict)
		}, 0, []string{"102:[198.19.1.2]"}, 2},
		{"not before the backoff", func() {}, 500 * time.Millisecond, nil, 2},
		{"then again", func() {}, 600 * time.Millisecond, []string{"102:[198.19.1.2]"}, 3},
		{"back to PERMISSIVE and STRICT again", func() { setMode("shop/a", v1alpha1.MTLSPermissive) }, 0, nil, 3},
		{"STRICT again", func() { setMode("shop/a", v1alpha1.MTLSStrict) }, 0, []string{"101:[198.19.1.1]"}, 4},
	} {
		step.do()
		now = now.Add(step.after)
		a.Apply(st)
		a.reconcile(t.Context(), now)
		if got := closer.took(); !slices.Equal(got, step.want) {
			t.Errorf("%s: ClosePlaintext calls %v, want %v", step.name, got, step.want)
		}
		if got := a.PlaintextClosed(); got != step.closed {
			t.Errorf("%s: PlaintextClosed() = %d, want %d", step.name, got, step.closed)
		}
		for _, p := range a.Pods() {
			if p.Err != "" || p.Ifindex == 0 {
				t.Errorf("%s: pod %+v not enrolled; a STRICT pod whose connections could not be closed stays enrolled", step.name, p)
			}
		}
	}
}
