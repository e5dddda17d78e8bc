package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// bridgedLinks answers like RouteLinks on a node of a bridge CNI: every
// pod address leads to cni0.
type bridgedLinks struct{}

func (bridgedLinks) PodLink(ip netip.Addr) (int, error) {
	return 0, fmt.Errorf("route to %s leaves through cni0, a bridge: %w", ip, ErrBridgedCNI)
}

// syncBuffer is a log sink safe for the agent's goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestAgentRefusesPodsOfABridgedCNILoudly(t *testing.T) {
	dp := newFakeDatapath()
	var logs syncBuffer
	a, err := New(Config{
		Node: "node-1", Datapath: dp, Links: bridgedLinks{},
		Logger:   slog.New(slog.NewTextHandler(&logs, nil)),
		RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond, Resync: 5 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	a.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.11", "", true}, pod{"shop/b", "node-1", "198.19.1.12", "", true}))
	want := "find veth: route to 198.19.1.11 leaves through cni0, a bridge: " + ErrBridgedCNI.Error()
	eventually(t, "both pods are refused, with the reason", func() bool {
		ps := a.Pods()
		return len(ps) == 2 && ps[0].Reason == ReasonBridgedCNI && ps[0].Err == want && ps[1].Reason == ReasonBridgedCNI &&
			ps[0].IP == netip.MustParseAddr("198.19.1.11") && ps[0].Ifindex == 0
	})
	// Many retries later, still refused, each pod counted once, and the
	// data path never touched: nothing is half enrolled.
	time.Sleep(30 * time.Millisecond)
	if n := a.RefusedBridged(); n != 2 {
		t.Errorf("RefusedBridged = %d after many passes; want 2 (each pod once while it is tracked)", n)
	}
	if calls := dp.callLog(); len(calls) != 0 {
		t.Errorf("data path calls = %v; a refused pod must not be enrolled", calls)
	}
	if ok, why := a.Ready(); !ok {
		t.Errorf("Ready = false (%s); the node itself stays ready, the pods say what is wrong", why)
	}
	out := logs.String()
	for _, p := range []string{"shop/a", "shop/b"} {
		line := ""
		for l := range strings.Lines(out) {
			if strings.Contains(l, "pod="+p) {
				line = l
				break
			}
		}
		if !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "bridged CNI is not supported") {
			t.Errorf("first log line about %s = %q; want an ERROR saying bridged CNI is not supported", p, line)
		}
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(a, nil, nil, nil))
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP mantlet_agent_refused_pods_total Times the agent refused to enroll a local meshed pod because mantlet cannot capture it on this node, by reason (BridgedCNINotSupported: the pod's address leads to a Linux bridge); counted once per pod and sandbox (a held pod whose sandbox the runtime retries counts again).
# TYPE mantlet_agent_refused_pods_total counter
mantlet_agent_refused_pods_total{reason="BridgedCNINotSupported"} 2
`), "mantlet_agent_refused_pods_total"); err != nil {
		t.Error(err)
	}
}
