package file

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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
	r.run(t)
	return r
}

// run runs the rig's watcher until the test ends.
func (r *watchRig) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.w.Run(ctx, func(m *Manifest) { r.applied <- m }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
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

func podIP(m *Manifest) string {
	ws := m.Snapshot.Workloads()
	if len(ws) != 1 {
		return fmt.Sprintf("(%d workloads)", len(ws))
	}
	return ws[0].IPs[0].String()
}

// eventually waits until cond holds, for at most 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitForLog(t *testing.T, logs *syncBuffer, want string) {
	t.Helper()
	eventually(t, fmt.Sprintf("log never contained %q; logs:\n%s", want, logs), func() bool { return strings.Contains(logs.String(), want) })
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
	// os.WriteFile empties the file before it writes it: on a loaded
	// machine the watcher may see the empty file settle, and reject it
	// too. So at least one rejection.
	st := r.w.ReloadStatus()
	if !st.LastEditRejected || st.Applied != 2 || st.Rejected < 1 || st.RejectedAt.IsZero() ||
		!slices.Equal(st.Problems, []string{`cluster.yaml: document 3 (Pod shop/a): status.podIP "198.19.1.300": not an IP address`}) {
		t.Errorf("after a bad edit, ReloadStatus() = %+v", st)
	}

	r.renameInto(t, clusterWith(4))
	r.wantApplied(t, "198.19.1.4")
	if st2 := r.w.ReloadStatus(); st2.Applied != 3 || st2.Rejected != st.Rejected || st2.LastEditRejected || st2.Problems != nil {
		t.Errorf("after a good edit, ReloadStatus() = %+v; want 3 applied, %d rejected, none pending", st2, st.Rejected)
	}
	select {
	case m := <-r.applied:
		t.Fatalf("applied one more manifest, with pod IP %s", podIP(m))
	default:
	}
}

func TestWatcherSurvivesTheFileDisappearing(t *testing.T) {
	r := startWatcher(t, time.Hour, true)
	if err := os.Remove(r.path); err != nil {
		t.Fatal(err)
	}
	waitForLog(t, r.logs, "config file unavailable; keeping the last good config")
	if st := r.w.ReloadStatus(); !st.LastEditRejected || len(st.Problems) != 1 || !strings.Contains(st.Problems[0], "no such file or directory") {
		t.Errorf("ReloadStatus() = %+v; want the missing file shown", st)
	}
	r.write(t, clusterWith(5))
	r.wantApplied(t, "198.19.1.5")
}

// configMap lays out dir as kubelet mounts a ConfigMap: cluster.yaml →
// ..data/cluster.yaml, ..data → the folder of the current version. swap
// writes a new version's folder, re-points ..data at it atomically and
// removes the old folder, as kubelet's atomic writer does.
type configMap struct {
	dir, current string
	n            int
}

func newConfigMap(t testing.TB, content string) *configMap {
	c := &configMap{dir: t.TempDir()}
	c.writeVersion(t, content)
	must(t, os.Symlink(c.current, filepath.Join(c.dir, "..data")))
	must(t, os.Symlink("..data/cluster.yaml", filepath.Join(c.dir, "cluster.yaml")))
	return c
}

func (c *configMap) writeVersion(t testing.TB, content string) {
	c.n++
	c.current = fmt.Sprintf("..2026_12_06_00_00_%02d.%d", c.n, 1000+c.n)
	must(t, os.Mkdir(filepath.Join(c.dir, c.current), 0o755))
	must(t, os.WriteFile(filepath.Join(c.dir, c.current, "cluster.yaml"), []byte(content), 0o644))
}

func (c *configMap) swap(t *testing.T, content string) {
	old := c.current
	c.writeVersion(t, content)
	must(t, os.Symlink(c.current, filepath.Join(c.dir, "..data_tmp")))
	must(t, os.Rename(filepath.Join(c.dir, "..data_tmp"), filepath.Join(c.dir, "..data")))
	must(t, os.RemoveAll(filepath.Join(c.dir, old)))
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestWatcherFollowsAConfigMapSymlinkSwap(t *testing.T) {
	c := newConfigMap(t, clusterWith(1))
	r := &watchRig{path: filepath.Join(c.dir, "cluster.yaml"), logs: &syncBuffer{}, applied: make(chan *Manifest, 4)}
	r.w = NewWatcher(r.path, slog.New(slog.NewTextHandler(r.logs, nil)), WatchOptions{Debounce: 20 * time.Millisecond, Poll: time.Hour})
	if _, err := r.w.Load(); err != nil {
		t.Fatal(err)
	}
	r.run(t)
	c.swap(t, clusterWith(2))
	r.wantApplied(t, "198.19.1.2")
	c.swap(t, clusterWith(3)) // the second swap proves the watch followed the first
	r.wantApplied(t, "198.19.1.3")
}

func TestWatcherFollowsALinkToAnotherDirectory(t *testing.T) {
	dir, elsewhere := t.TempDir(), t.TempDir()
	target := filepath.Join(elsewhere, "real.yaml")
	must(t, os.WriteFile(target, []byte(clusterWith(1)), 0o600))
	r := &watchRig{path: filepath.Join(dir, "cluster.yaml"), logs: &syncBuffer{}, applied: make(chan *Manifest, 4)}
	must(t, os.Symlink(target, r.path))
	r.w = NewWatcher(r.path, slog.New(slog.NewTextHandler(r.logs, nil)), WatchOptions{Debounce: 20 * time.Millisecond, Poll: time.Hour})
	if _, err := r.w.Load(); err != nil {
		t.Fatal(err)
	}
	r.run(t)
	must(t, os.WriteFile(target, []byte(clusterWith(2)), 0o600)) // edited in place where it lives
	r.wantApplied(t, "198.19.1.2")
}

// TestWatcherIgnoresOtherFilesOfItsDirectory: a log written next to the
// file in a loop makes no check and no read of the file (and does not keep
// postponing one), while the file's own change is applied as usual.
func TestWatcherIgnoresOtherFilesOfItsDirectory(t *testing.T) {
	r := startWatcher(t, time.Hour, true)
	eventually(t, "Run's first check", func() bool { return r.w.checks.Load() >= 1 })
	checks, reads := r.w.checks.Load(), r.w.reads.Load()
	f, err := os.OpenFile(filepath.Join(filepath.Dir(r.path), "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := range 2000 {
		if _, err := fmt.Fprintf(f, "line %d\n", i); err != nil {
			t.Fatal(err)
		}
	}
	// Notifications arrive in order: once the edit that follows the log's
	// lines is applied, the watcher has seen every one of them.
	r.renameInto(t, clusterWith(2))
	r.wantApplied(t, "198.19.1.2")
	if got := r.w.reads.Load() - reads; got != 1 {
		t.Errorf("%d reads of the file; want 1, for the edit", got)
	}
	// The rename's notifications (the new name, the old file's unlink),
	// then the timer when the new version has settled: a handful, where
	// notifications of the log's 2,000 writes would make hundreds.
	if got := r.w.checks.Load() - checks; got >= 10 {
		t.Errorf("%d checks of the file; want a handful: the log next to it made the watcher look", got)
	}
}

func TestWatcherPollsWhenNotificationsAreLost(t *testing.T) {
	r := startWatcher(t, 50*time.Millisecond, false)
	// Past Run's first check, only polling can see the edit.
	eventually(t, "Run's first check", func() bool { return r.w.checks.Load() >= 1 })
	r.renameInto(t, clusterWith(6))
	r.wantApplied(t, "198.19.1.6")
}

// The tests below drive the watcher's checks by hand, at instants they
// choose, so that timing cannot change what they see.

const testDebounce, testConfirm = 100 * time.Millisecond, 2 * time.Second

// handRig is a watcher whose checks the test makes.
type handRig struct {
	w       *Watcher
	path    string
	logs    *syncBuffer
	applied []*Manifest
	now     time.Time
}

func newHandRig(t *testing.T, content string) *handRig {
	t.Helper()
	h := &handRig{path: filepath.Join(t.TempDir(), "cluster.yaml"), logs: &syncBuffer{}, now: time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)}
	must(t, os.WriteFile(h.path, []byte(content), 0o600))
	h.w = NewWatcher(h.path, slog.New(slog.NewTextHandler(h.logs, nil)), WatchOptions{Options: policyKinds, Debounce: testDebounce, Confirm: testConfirm})
	if _, err := h.w.Load(); err != nil {
		t.Fatal(err)
	}
	return h
}

// checkAt advances the clock by d and checks the file.
func (h *handRig) checkAt(d time.Duration) time.Duration {
	h.now = h.now.Add(d)
	return h.w.check(h.now, func(m *Manifest) { h.applied = append(h.applied, m) })
}

// settle checks the file as a watcher would until nothing is waiting.
func (h *handRig) settle() {
	for again := h.checkAt(0); again > 0; again = h.checkAt(again) {
	}
}

// meshed is a file with a meshed pod and a DENY policy.
var meshed = clusterWith(2) + "\n---\n" + `apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {name: deny-all, namespace: shop}
spec: {action: DENY}
`

// TestWatcherNeverAppliesAFileBeingRewritten writes the file as a shell's
// `kubectl get … -o yaml > cluster.yaml` does: it truncates the file, then
// writes it, here one byte more at a time. At every step the watcher
// checks the file at once, after the debounce, and during a stall of the
// writer shorter than WatchOptions.Confirm: nothing it applies ever takes
// the pod out of the mesh or drops the policy, and the whole file is
// applied once written.
func TestWatcherNeverAppliesAFileBeingRewritten(t *testing.T) {
	h := newHandRig(t, meshed)
	f, err := os.OpenFile(h.path, os.O_WRONLY|os.O_TRUNC, 0) // the shell's ">"
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := strings.Replace(meshed, "198.19.1.2", "198.19.1.3", 1)
	for n := 0; n <= len(want); n++ {
		if n > 0 {
			if _, err := f.WriteString(want[n-1 : n]); err != nil {
				t.Fatal(err)
			}
		}
		h.checkAt(time.Millisecond)
		h.checkAt(testDebounce)
		h.checkAt(testConfirm / 2)
		for _, m := range h.applied {
			if enrolled(m) != 1 || len(m.Extra) != 1 {
				t.Fatalf("after %d of %d bytes, applied a version with %d meshed pods and %d policies:\n%s", n, len(want), enrolled(m), len(m.Extra), want[:n])
			}
		}
	}
	h.settle()
	if len(h.applied) == 0 || podIP(h.applied[len(h.applied)-1]) != "198.19.1.3" {
		t.Fatalf("the whole file was not applied last; logs:\n%s", h.logs)
	}
	if st := h.w.ReloadStatus(); st.LastEditRejected {
		t.Errorf("the whole file is in force, but ReloadStatus() = %+v", st)
	}
}

func TestWatcherRefusesAnEmptyFile(t *testing.T) {
	h := newHandRig(t, meshed)
	must(t, os.Truncate(h.path, 0))
	if again := h.checkAt(0); again != testDebounce {
		t.Fatalf("a new version is checked again after %v; want the debounce %v", again, testDebounce)
	}
	if again := h.checkAt(testDebounce); again != 0 {
		t.Fatalf("a settled empty file is checked again after %v", again)
	}
	h.checkAt(time.Hour)
	if len(h.applied) != 0 {
		t.Fatalf("applied an empty file: %d workloads", len(h.applied[0].Snapshot.Workloads()))
	}
	want := ReloadStatus{File: h.path, Rejected: 1, AppliedAt: h.w.status.AppliedAt, RejectedAt: h.now.Add(-time.Hour),
		LastEditRejected: true, Problems: []string{"cluster.yaml: " + NoObjects}}
	if st := h.w.ReloadStatus(); !reflectEqual(st, want) {
		t.Fatalf("ReloadStatus() = %+v\nwant %+v", st, want)
	}
	if !strings.Contains(h.logs.String(), "config file rejected; keeping the last good config") {
		t.Errorf("the rejection was not logged:\n%s", h.logs)
	}
}

func reflectEqual(a, b ReloadStatus) bool {
	return a.File == b.File && a.Applied == b.Applied && a.Rejected == b.Rejected && a.AppliedAt.Equal(b.AppliedAt) &&
		a.RejectedAt.Equal(b.RejectedAt) && a.LastEditRejected == b.LastEditRejected && slices.Equal(a.Problems, b.Problems)
}

// TestWatcherAppliesAnExplicitEmptyingOnceItStays: a file that takes every
// pod out of the mesh and drops every policy on purpose (an empty List)
// is applied, once it has stayed unchanged for WatchOptions.Confirm.
func TestWatcherAppliesAnExplicitEmptyingOnceItStays(t *testing.T) {
	h := newHandRig(t, meshed)
	must(t, os.WriteFile(h.path, []byte("{apiVersion: v1, kind: List, items: []}\n"), 0o600))
	h.checkAt(0)
	if again := h.checkAt(testDebounce); again != testConfirm-testDebounce {
		t.Fatalf("held for %v more; want %v", again, testConfirm-testDebounce)
	}
	h.checkAt(testConfirm - testDebounce - time.Millisecond)
	if len(h.applied) != 0 {
		t.Fatal("applied before the file stayed unchanged for WatchOptions.Confirm")
	}
	h.checkAt(time.Millisecond)
	if len(h.applied) != 1 || len(h.applied[0].Snapshot.Workloads()) != 0 || len(h.applied[0].Extra) != 0 {
		t.Fatalf("applied %d versions; want the empty one", len(h.applied))
	}
	if want := "config file: this version takes every pod out of the mesh, removes every MeshPolicy; it is applied only if the file stays unchanged for 2s"; !strings.Contains(h.logs.String(), want) {
		t.Errorf("the hold was not logged as %q:\n%s", want, h.logs)
	}
}

// TestWatcherRemembersARejectedVersion: a rejected version is not read
// again until the file changes: not a file over the size limit (not even
// once), not one that does not parse.
func TestWatcherRemembersARejectedVersion(t *testing.T) {
	for _, tc := range []struct {
		name      string
		write     func(path string) error
		wantReads uint64
		want      string
	}{
		{"a file over the size limit", func(path string) error { return os.Truncate(path, MaxFileSize+1) }, 0,
			fmt.Sprintf("manifest: %%s: %d bytes, larger than 64 MiB", MaxFileSize+1)},
		{"a file that does not parse", func(path string) error { return os.WriteFile(path, []byte("kind: [\n"), 0o600) }, 1,
			"cluster.yaml: document 1: not valid YAML: line 1: did not find expected node content"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHandRig(t, meshed)
			reads := h.w.reads.Load()
			must(t, tc.write(h.path))
			for range 100 {
				h.checkAt(testDebounce)
			}
			st := h.w.ReloadStatus()
			if want := strings.ReplaceAll(tc.want, "%s", h.path); st.Rejected != 1 || !slices.Equal(st.Problems, []string{want}) {
				t.Errorf("ReloadStatus() = %+v; want one rejection: %s", st, want)
			}
			if got := h.w.reads.Load() - reads; got != tc.wantReads {
				t.Errorf("read the file %d times in 100 checks; want %d", got, tc.wantReads)
			}
			must(t, os.WriteFile(h.path, []byte(meshed), 0o600))
			h.settle()
			if st := h.w.ReloadStatus(); st.LastEditRejected || len(h.applied) != 0 {
				t.Errorf("back to the version in force: ReloadStatus() = %+v, %d applied; want nothing rejected or applied", st, len(h.applied))
			}
			if !strings.Contains(h.logs.String(), "config file is back to the version in force") {
				t.Errorf("the return was not logged:\n%s", h.logs)
			}
		})
	}
}

func TestWatcherIgnoresRewritesWithTheSameContent(t *testing.T) {
	h := newHandRig(t, meshed)
	reads := h.w.reads.Load()
	tmp := h.path + ".tmp"
	must(t, os.WriteFile(tmp, []byte(meshed), 0o600))
	must(t, os.Rename(tmp, h.path))
	h.settle()
	h.checkAt(time.Hour)
	if len(h.applied) != 0 || h.w.reads.Load()-reads != 1 {
		t.Fatalf("applied %d versions and read the file %d times; want none and once", len(h.applied), h.w.reads.Load()-reads)
	}
}

func TestResolveFollowsAConfigMapMount(t *testing.T) {
	c := newConfigMap(t, clusterWith(1))
	names, dirs := resolve(filepath.Join(c.dir, "cluster.yaml"))
	wantNames := []string{filepath.Join(c.dir, "cluster.yaml"), filepath.Join(c.dir, "..data"), filepath.Join(c.dir, c.current, "cluster.yaml")}
	wantDirs := []string{c.dir, filepath.Join(c.dir, c.current)}
	if !slices.Equal(names, wantNames) || !slices.Equal(dirs, wantDirs) {
		t.Fatalf("resolve = %q, %q\nwant %q, %q", names, dirs, wantNames, wantDirs)
	}
	names, dirs = resolve(filepath.Join(c.dir, "missing.yaml"))
	if !slices.Equal(names, []string{filepath.Join(c.dir, "missing.yaml")}) || !slices.Equal(dirs, []string{c.dir}) {
		t.Fatalf("resolve(missing) = %q, %q", names, dirs)
	}
}
