//go:build linux

package ztunnel

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// The kernel behaviour the ends of proxied connections rely on (see
// reset.go), checked on the machine the tests run on.

// tcpPairT returns both ends of a loopback TCP connection.
func tcpPairT(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// readEnd reads c until it fails or ends and returns what it read and the
// error (nil for EOF).
func readEnd(t *testing.T, c net.Conn) ([]byte, error) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection neither ended nor failed within 10s (read %d bytes)", len(b))
	}
	return b, err
}

func TestKernelEndsArmedSocketsWithAReset(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	for _, tc := range []struct {
		name      string
		end       func(c *net.TCPConn)
		wantReset bool
	}{
		{"an armed socket, closed", func(c *net.TCPConn) {
			armReset(c)
			c.Write(data)
			c.Close()
		}, true},
		// CloseWrite sends its FIN even when armed: the peer reads the end
		// of the data before the reset the close then sends.
		{"an armed socket, half-closed, then closed armed", func(c *net.TCPConn) {
			armReset(c)
			c.Write(data)
			c.CloseWrite()
			c.Close()
		}, false},
		{"an armed socket, half-closed, then closed in order", func(c *net.TCPConn) {
			armReset(c)
			c.Write(data)
			c.CloseWrite()
			closeOrderly(c)
		}, false},
		{"a socket never armed, reset", func(c *net.TCPConn) {
			c.Write(data)
			closeReset(c)
		}, true},
		{"a socket never armed, closed", func(c *net.TCPConn) {
			c.Write(data)
			c.Close()
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peer, c := tcpPairT(t)
			// The peer reads only after the end: what was sent waits in its
			// receive queue, and is still read before the reset is.
			tc.end(c)
			got, err := readEnd(t, peer)
			if !bytes.Equal(got, data) {
				t.Errorf("the peer read %d bytes, want the %d sent", len(got), len(data))
			}
			if reset := errors.Is(err, syscall.ECONNRESET); reset != tc.wantReset || !reset && err != nil {
				t.Errorf("the peer's read ended with %v; want a reset: %v", err, tc.wantReset)
			}
		})
	}
}

// helperEnv names the address a helper process connects to.
const helperEnv = "ZTUNNEL_TEST_RESET_HELPER"

// TestHelperProcessHoldsASocket is not a test: run by
// TestKernelResetsTheSocketsOfADeadProcess in a child process, it connects
// to the address in $ZTUNNEL_TEST_RESET_HELPER, arms the socket if asked,
// says "ready" and waits to be killed.
func TestHelperProcessHoldsASocket(t *testing.T) {
	addr := os.Getenv(helperEnv)
	if addr == "" {
		t.Skip("a helper process of TestKernelResetsTheSocketsOfADeadProcess")
	}
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if os.Getenv(helperEnv+"_ARM") != "" {
		armReset(c)
	}
	c.Write([]byte("ready"))
	time.Sleep(time.Minute) // the parent kills us long before
	os.Exit(2)
}

func TestKernelResetsTheSocketsOfADeadProcess(t *testing.T) {
	for _, tc := range []struct {
		name      string
		arm       bool
		wantReset bool
	}{
		{"armed: the peer reads a reset", true, true},
		{"not armed: the peer reads a clean end of data", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcessHoldsASocket$")
			cmd.Env = append(os.Environ(), helperEnv+"="+ln.Addr().String())
			if tc.arm {
				cmd.Env = append(cmd.Env, helperEnv+"_ARM=1")
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waited := false
			defer func() {
				if !waited {
					cmd.Process.Kill()
					cmd.Wait()
				}
			}()
			c, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ready := make([]byte, 5)
			_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.ReadFull(c, ready); err != nil {
				t.Fatalf("helper: %v", err)
			}
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			cmd.Wait()
			waited = true
			_, err = readEnd(t, c)
			if reset := errors.Is(err, syscall.ECONNRESET); reset != tc.wantReset || !reset && err != nil {
				t.Fatalf("after the helper's death the read ended with %v; want a reset: %v", err, tc.wantReset)
			}
		})
	}
}
