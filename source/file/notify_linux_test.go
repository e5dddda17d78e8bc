package file

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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

// TestWatcherPollRewatchesOnlyWhenTheWatchesNoLongerFit drives polls by
// hand: an idle poll (file and links unchanged, every watch in place)
// does not resolve the path again; a poll after a change whose
// notification was lost does, as does every poll while a folder of the
// file is missing, until it is back.
func TestWatcherPollRewatchesOnlyWhenTheWatchesNoLongerFit(t *testing.T) {
	c := newConfigMap(t, clusterWith(1))
	path := filepath.Join(c.dir, "cluster.yaml")
	w := NewWatcher(path, slog.New(slog.DiscardHandler), WatchOptions{Debounce: testDebounce})
	if _, err := w.Load(); err != nil {
		t.Fatal(err)
	}
	n, err := newNotifier(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { n.close() }() // the last notifier made
	var applied []string
	now := time.Now()
	// poll polls once, then checks until the file has settled, and
	// returns how many times the path was resolved.
	poll := func() uint64 {
		t.Helper()
		before := n.updates.Load()
		apply := func(m *Manifest) { applied = append(applied, podIP(m)) }
		now = now.Add(DefaultPoll)
		for again := w.poll(n, now, apply); again > 0; again = w.check(now, apply) {
			now = now.Add(again)
		}
		return n.updates.Load() - before
	}
	watched := func() []string {
		n.mu.Lock()
		defer n.mu.Unlock()
		return slices.Clone(n.names)
	}

	for i := range 5 {
		if got := poll(); got != 0 {
			t.Fatalf("idle poll %d resolved the path %d times; want none", i, got)
		}
	}
	// The notifications of the swap are never read here (Run would): to
	// the watcher they are lost.
	c.swap(t, clusterWith(2))
	if got := poll(); got != 1 {
		t.Fatalf("the poll after a ConfigMap swap resolved the path %d times; want once", got)
	}
	if want := filepath.Join(c.dir, c.current, "cluster.yaml"); !slices.Contains(watched(), want) {
		t.Errorf("after the swap, watching %q; want %s among them", watched(), want)
	}
	if !slices.Equal(applied, []string{"198.19.1.2"}) {
		t.Errorf("applied %v; want the swapped-in version", applied)
	}
	if got := poll(); got != 0 {
		t.Fatalf("the poll after that resolved the path %d times; want none", got)
	}

	// The folder of the file goes: every poll tries to watch it again,
	// and the one after it is back finds it.
	plain := filepath.Join(t.TempDir(), "conf")
	must(t, os.Mkdir(plain, 0o755))
	path = filepath.Join(plain, "cluster.yaml")
	must(t, os.WriteFile(path, []byte(clusterWith(3)), 0o600))
	w = NewWatcher(path, slog.New(slog.DiscardHandler), WatchOptions{Debounce: testDebounce})
	if _, err := w.Load(); err != nil {
		t.Fatal(err)
	}
	n.close()
	if n, err = newNotifier(path); err != nil {
		t.Fatal(err)
	}
	applied = nil
	must(t, os.RemoveAll(plain))
	for i := range 3 {
		if got := poll(); got != 1 {
			t.Fatalf("poll %d without the folder resolved the path %d times; want once", i, got)
		}
	}
	must(t, os.Mkdir(plain, 0o755))
	must(t, os.WriteFile(path, []byte(clusterWith(4)), 0o600))
	if got := poll(); got != 1 {
		t.Fatalf("the poll after the folder came back resolved the path %d times; want once", got)
	}
	if got := poll(); got != 0 {
		t.Fatalf("the poll after that resolved the path %d times; want none", got)
	}
	if !slices.Equal(applied, []string{"198.19.1.4"}) {
		t.Errorf("applied %v; want the version written after the folder came back", applied)
	}
}
