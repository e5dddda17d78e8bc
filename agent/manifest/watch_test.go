package manifest

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a log sink that tests can read while the watcher writes.
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

// clusterWith returns a valid file whose one pod has IP 198.19.1.<n>.
func clusterWith(n int) string {
	return base + fmt.Sprintf(`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.%d}}`, n)
}

type watchRig struct {
	w       *Watcher
	path    string
	logs    *syncBuffer
	applied chan *Manifest
}

// startWatcher writes the first version of the file, loads it and runs a
// watcher until the test ends.
func startWatcher(t *testing.T, poll time.Duration, notify bool) *watchRig {
	t.Helper()
	dir := t.TempDir()
	r := &watchRig{path: filepath.Join(dir, "cluster.yaml"), logs: &syncBuffer{}, applied: make(chan *Manifest, 16)}
	r.write(t, clusterWith(1))
	w := NewWatcher(r.path, slog.New(slog.NewTextHandler(r.logs, nil)), WatchOptions{Debounce: 20 * time.Millisecond, Poll: poll})
	w.notify = notify
	r.w = w
	m, err := w.Load()
	if err != nil {
		t.Fatal(err)
	}
	if ip := podIP(m); ip != "198.19.1.1" {
		t.Fatalf("first load: pod IP %s", ip)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, func(m *Manifest) { r.applied <- m }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r
}

func (r *watchRig) write(t *testing.T, content string) {
	t.Helper()
	if err := os.WriteFile(r.path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// renameInto writes content to a temporary file and renames it over the
// watched file, as editors and atomic writers do.
func (r *watchRig) renameInto(t *testing.T, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(r.path), ".cluster.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, r.path); err != nil {
		t.Fatal(err)
	}
}

func (r *watchRig) wantApplied(t *testing.T, ip string) {
	t.Helper()
	select {
	case m := <-r.applied:
		if got := podIP(m); got != ip {
			t.Fatalf("applied a manifest with pod IP %s, want %s", got, ip)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no manifest with pod IP %s applied within 5s; logs:\n%s", ip, r.logs)
	}
}

func (r *watchRig) wantNothingApplied(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case m := <-r.applied:
		t.Fatalf("applied a manifest with pod IP %s; want none", podIP(m))
	case <-time.After(within):
	}
}

func podIP(m *Manifest) string {
	ws := m.Snapshot.Workloads()
	if len(ws) != 1 {
		return fmt.Sprintf("(%d workloads)", len(ws))
	}
	return ws[0].IPs[0].String()
}

func waitForLog(t *testing.T, logs *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("log never contained %q; logs:\n%s", want, logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestWatcherAppliesEditsAndKeepsTheLastGoodOnBadOnes(t *testing.T) {
	r := startWatcher(t, time.Hour, true) // notifications only: polling would hide a broken watch
	r.renameInto(t, clusterWith(2))
	r.wantApplied(t, "198.19.1.2")

	r.write(t, clusterWith(3)) // in-place rewrite, as kubectl or a shell redirect does
	r.wantApplied(t, "198.19.1.3")

	r.write(t, base+`{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.300}}`)
	waitForLog(t, r.logs, `cluster.yaml: document 3 (Pod shop/a): status.podIP \"198.19.1.300\": not an IP address`)
	if !strings.Contains(r.logs.String(), "problem.field=status.podIP") {
		t.Errorf("the rejected edit was not logged with its field as an attribute:\n%s", r.logs)
	}
	r.wantNothingApplied(t, 200*time.Millisecond)

	r.renameInto(t, clusterWith(4))
	r.wantApplied(t, "198.19.1.4")
	if applied, rejected := r.w.Reloads(); applied != 3 || rejected != 1 {
		t.Errorf("Reloads() = %d applied, %d rejected; want 3 and 1", applied, rejected)
	}
}

func TestWatcherSurvivesTheFileDisappearing(t *testing.T) {
	r := startWatcher(t, time.Hour, true)
	if err := os.Remove(r.path); err != nil {
		t.Fatal(err)
	}
	waitForLog(t, r.logs, "config file unavailable; keeping the last good config")
	r.wantNothingApplied(t, 100*time.Millisecond)
	r.write(t, clusterWith(5))
	r.wantApplied(t, "198.19.1.5")
}

func TestWatcherFollowsASymlinkSwap(t *testing.T) {
	// Kubernetes mounts ConfigMaps as cluster.yaml -> ..data/cluster.yaml
	// and updates them by re-pointing ..data.
	dir := t.TempDir()
	for i, d := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, d, "cluster.yaml"), []byte(clusterWith(i+1)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink("v1", filepath.Join(dir, "..data")))
	must(os.Symlink("..data/cluster.yaml", filepath.Join(dir, "cluster.yaml")))
	applied := make(chan *Manifest, 4)
	w := NewWatcher(filepath.Join(dir, "cluster.yaml"), slog.New(slog.DiscardHandler), WatchOptions{Debounce: 20 * time.Millisecond, Poll: time.Hour})
	if _, err := w.Load(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = w.Run(ctx, func(m *Manifest) { applied <- m }) }()
	t.Cleanup(func() { cancel(); <-done })

	must(os.Symlink("v2", filepath.Join(dir, "..data_tmp")))
	must(os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	select {
	case m := <-applied:
		if podIP(m) != "198.19.1.2" {
			t.Fatalf("applied pod IP %s, want 198.19.1.2", podIP(m))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the symlink swap was not seen within 5s")
	}
}

func TestWatcherPollsWhenNotificationsAreLost(t *testing.T) {
	r := startWatcher(t, 50*time.Millisecond, false)
	time.Sleep(100 * time.Millisecond) // past Run's first check: only polling can see the edit
	r.renameInto(t, clusterWith(6))
	r.wantApplied(t, "198.19.1.6")
}

func TestWatcherIgnoresRewritesWithTheSameContent(t *testing.T) {
	r := startWatcher(t, 50*time.Millisecond, true)
	r.renameInto(t, clusterWith(1))
	r.wantNothingApplied(t, 300*time.Millisecond)
}
