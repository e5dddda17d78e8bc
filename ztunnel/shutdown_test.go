// The in-process mesh needs all of 127.0.0.0/8 on loopback and Linux socket
// options: Linux only.

//go:build linux

package ztunnel_test

import (
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"
)

func TestShutdownDrainsOpenFlows(t *testing.T) {
	m := newMesh(t, meshOpts{})
	a := m.nodes["node-a"]
	c := m.mustDial(ipA1, m.appAddr(ipB1))
	c.Write([]byte("in flight"))
	buf := make([]byte, 9)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.p.Shutdown(context.Background()) }()
	// New connections are refused while the open one keeps working.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c2, err := m.dial(ipA1, m.appAddr(ipB1))
		if err != nil {
			break
		}
		// Accepted before the listener closed: a flow Shutdown waits for.
		c2.Close()
		if time.Now().After(deadline) {
			t.Fatal("still accepting during shutdown")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a flow open", err)
	case <-time.After(100 * time.Millisecond):
	}
	if got := roundTrip(t, c, []byte(" and done")); string(got) != " and done" {
		t.Fatalf("open flow broke during shutdown: %q", got)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown = %v", err)
	}
}

func TestShutdownDeadlineClosesFlows(t *testing.T) {
	m := newMesh(t, meshOpts{})
	c := m.mustDial(ipA1, m.appAddr(ipB1))
	c.Write([]byte("x"))
	io.ReadFull(c, make([]byte, 1))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := m.nodes["node-a"].p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the flow stayed open after the shutdown deadline")
	}
}
