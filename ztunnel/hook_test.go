//go:build linux

package ztunnel_test

import (
	"io"
	"net/netip"
	"sync"
	"testing"

	"github.com/mantlet/mantlet/ztunnel"
)

// TestOnFlowOpenPairsWithOnFlowEnd checks the hooks metrics hang on: every
// admitted flow is announced once when it opens, with the id its
// FlowRecord ends with; a refused flow is never announced and ends with
// id 0.
func TestOnFlowOpenPairsWithOnFlowEnd(t *testing.T) {
	// Ids are unique per Proxy; here the outbound flows are node-a's and
	// the inbound ones node-b's.
	type key struct {
		dir ztunnel.Direction
		id  uint64
	}
	var mu sync.Mutex
	opened := map[key]bool{}
	m := newMesh(t, meshOpts{tuning: ztunnel.Config{OnFlowOpen: func(l *ztunnel.LiveFlow) {
		mu.Lock()
		defer mu.Unlock()
		k := key{l.Direction(), l.ID()}
		if opened[k] || l.ID() == 0 {
			t.Errorf("flow %v announced twice or with id 0", k)
		}
		opened[k] = true
	}}})
	c := m.mustDial(ipA1, m.appAddr(ipB1))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if got, err := io.ReadAll(c); err != nil || string(got) != "ping" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	for _, n := range []*node{m.nodes["node-a"], m.nodes["node-b"]} {
		r := n.flow(t)
		mu.Lock()
		ok := opened[key{r.Direction, r.ID}]
		mu.Unlock()
		if !ok || r.Flag != ztunnel.FlagNone {
			t.Errorf("%s: flow ended with id %d (%s, %s); opened: %v", n.name, r.ID, r.Direction, r.Flag, opened)
		}
	}

	// A connection to the ztunnel's own port is refused before it is a flow.
	n := m.nodes["node-a"]
	loop := m.mustDial(ipA1, netip.AddrPortFrom(ipA2, n.out))
	io.ReadAll(loop)
	if r := n.flow(t); r.ID != 0 || r.Flag != ztunnel.FlagLoop {
		t.Errorf("refused flow ended with id %d, flag %s; want 0, %s", r.ID, r.Flag, ztunnel.FlagLoop)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(opened) != 2 {
		t.Errorf("%d flows announced, want 2: %v", len(opened), opened)
	}
}
