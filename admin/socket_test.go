package admin_test

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/mantlet/mantlet/admin"
)

// An agent killed with SIGKILL leaves its socket file; `mantlet agent
// --cleanup` removes it and its folder, but never a socket that a live
// agent serves.
func TestRemoveStaleSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "node1")
	path := filepath.Join(dir, "admin.sock")

	ln, err := admin.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	if removed, err := admin.RemoveStaleSocket(path); removed || err == nil {
		t.Errorf("RemoveStaleSocket of a served socket = %v, %v; want it kept, with an error", removed, err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the served socket is gone: %v", err)
	}
	// Close without unlinking, as a killed process leaves it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("setting up a stale socket: %v", err)
	}
	if removed, err := admin.RemoveStaleSocket(path); !removed || err != nil {
		t.Errorf("RemoveStaleSocket of a stale socket = %v, %v; want it removed", removed, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the socket's folder is still there (%v)", err)
	}
	if removed, err := admin.RemoveStaleSocket(path); removed || err != nil {
		t.Errorf("RemoveStaleSocket with nothing there = %v, %v; want nothing done", removed, err)
	}

	file := filepath.Join(t.TempDir(), "admin.sock")
	if err := os.WriteFile(file, []byte("not a socket"), 0o600); err != nil {
		t.Fatal(err)
	}
	if removed, err := admin.RemoveStaleSocket(file); removed || err == nil {
		t.Errorf("RemoveStaleSocket of a regular file = %v, %v; want it kept, with an error", removed, err)
	}
}
