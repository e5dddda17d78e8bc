package file

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestNotifierGetsNoEventsOfOtherFiles: the kernel does not deliver the
// writes to a file next to the watched one, so a busy log there costs
// nothing.
func TestNotifierGetsNoEventsOfOtherFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	must(t, os.WriteFile(path, []byte(clusterWith(1)), 0o600))
	n, err := newNotifier(path)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	log, err := os.OpenFile(filepath.Join(dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	for i := range 2000 {
		if _, err := fmt.Fprintf(log, "line %d\n", i); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Events are read in order: when the file's write is signalled, every
	// event queued before it has been read and counted.
	select {
	case <-n.C:
	case <-time.After(5 * time.Second):
		t.Fatal("the write to the file was not signalled within 5s")
	}
	// The log's creation, then the file's modification and close.
	if got := n.events.Load(); got > 4 {
		t.Fatalf("read %d inotify events; want at most 4: the log's writes were delivered", got)
	}
}
