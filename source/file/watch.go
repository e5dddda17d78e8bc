package file

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of WatchOptions.
const (
	DefaultDebounce = 150 * time.Millisecond
	DefaultPoll     = 2 * time.Second
	DefaultConfirm  = 2 * time.Second
)

// WatchOptions tune a Watcher. The zero value uses the defaults.
type WatchOptions struct {
	// Options are handed to Parse.
	Options Options
	// Debounce is how long a new version of the file must stay unchanged
	// (same size, modification time and inode) before it is read: writers
	// write in several steps, and a file caught half-written must not be
	// applied.
	Debounce time.Duration
	// Poll is how often the file is re-checked without a notification, for
	// file systems and set-ups where notifications are lost.
	Poll time.Duration
	// Confirm is how long a version that parses but takes every pod out of
	// the mesh, or removes every policy or every mTLS annotation, must stay
	// unchanged before it is applied. A file cut at a document boundary
	// by a writer that stalled looks like that.
	Confirm time.Duration
}

// Watcher loads the cluster file and reloads it when it changes. It
// reacts to changes of the file only, however they are made: in-place
// writes, editors' rename-into-place, and the symbolic-link swap of
// Kubernetes ConfigMap mounts. It applies a version only once the file has
// stayed unchanged for WatchOptions.Debounce and was read whole, and
// re-checks the file every WatchOptions.Poll in case a notification is
// lost. Notifications come from Linux's inotify; elsewhere it only polls.
//
// A version that does not parse, or holds no object at all (see
// NoObjects), is rejected: it is logged problem by problem, counted and
// shown by ReloadStatus, and the last good version stays in force. A
// rejected version is remembered, so it is not read again until the file
// changes.
type Watcher struct {
	path string
	log  *slog.Logger
	opts WatchOptions
	// notify is false in tests of the polling fallback.
	notify bool

	// Owned by Load, then by Run's goroutine.
	done      fileVersion // the version last dealt with: applied, rejected or the same as the one in force
	cand      fileVersion // a newer version, waiting to settle
	candSince time.Time   // when cand was first seen
	held      bool        // cand was logged as held by WatchOptions.Confirm
	inForce   *Manifest
	// inForceSum and rejectedSum hash the content in force and the last
	// rejected content (zero when the last version was applied).
	inForceSum, rejectedSum [sha256.Size]byte

	// checks and reads count calls of check and reads of the file, for
	// tests.
	checks, reads atomic.Uint64

	mu     sync.Mutex
	status ReloadStatus
}

// ReloadStatus says what a Watcher did with the versions of its file.
type ReloadStatus struct {
	// File is the watched path.
	File string
	// Applied and Rejected count the versions Run applied and rejected.
	Applied, Rejected uint64
	// AppliedAt is when the version in force was read (by Load) or
	// applied (by Run).
	AppliedAt time.Time
	// RejectedAt is when a version was last rejected; zero if none was.
	RejectedAt time.Time
	// LastEditRejected is true while the newest version of the file is
	// rejected, so the version applied at AppliedAt stays in force.
	// Problems then says why, one line per problem.
	LastEditRejected bool
	Problems         []string
}

// ReloadStatus returns what the watcher did so far. It is safe to call
// from any goroutine.
func (w *Watcher) ReloadStatus() ReloadStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := w.status
	st.Problems = slices.Clone(st.Problems)
	return st
}

// NewWatcher returns a watcher of the file at path. It does nothing until
// Load or Run.
func NewWatcher(path string, log *slog.Logger, opts WatchOptions) *Watcher {
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.Poll <= 0 {
		opts.Poll = DefaultPoll
	}
	if opts.Confirm <= 0 {
		opts.Confirm = DefaultConfirm
	}
	return &Watcher{path: path, log: log, opts: opts, notify: true, status: ReloadStatus{File: path}}
}

// Path returns the watched file's path.
func (w *Watcher) Path() string { return w.path }

// loadWaits bounds how many times Load waits for a file that was just
// modified to settle.
const loadWaits = 10

// Load reads and parses the file now. When the file was modified less
// than WatchOptions.Debounce ago, Load first waits until it was not (a
// bounded number of times), so that an agent starting while the file is
// rewritten does not read half of it. Run compares later versions with
// the one Load read, so a change made between Load and Run is not missed.
// Load and Run must not run concurrently.
func (w *Watcher) Load() (*Manifest, error) {
	for range loadWaits {
		st, err := os.Stat(w.path)
		if err != nil {
			break // read says why
		}
		age := time.Since(st.ModTime())
		if age >= w.opts.Debounce {
			break
		}
		time.Sleep(min(w.opts.Debounce-age, w.opts.Debounce))
	}
	v, data, err := w.read()
	if err != nil {
		return nil, err
	}
	m, err := Parse(filepath.Base(w.path), data, w.opts.Options)
	if err != nil {
		return nil, err
	}
	w.done, w.inForce, w.inForceSum = v, m, sha256.Sum256(data)
	w.mu.Lock()
	w.status.AppliedAt = time.Now()
	w.mu.Unlock()
	w.logWarnings(m)
	return m, nil
}

// errChanged says the file changed while it was read.
var errChanged = errors.New("changed while it was read")

// read reads the file whole. The version returned is the one read; with
// errChanged, the one found after reading.
func (w *Watcher) read() (fileVersion, []byte, error) {
	f, err := os.Open(w.path)
	if err != nil {
		return fileVersion{}, nil, fmt.Errorf("manifest: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fileVersion{}, nil, fmt.Errorf("manifest: %w", err)
	}
	v := versionOf(st)
	if st.Size() > MaxFileSize {
		return v, nil, fmt.Errorf("manifest: %s: %d bytes, larger than %d MiB", w.path, st.Size(), MaxFileSize>>20)
	}
	w.reads.Add(1)
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return v, nil, fmt.Errorf("manifest: read %s: %w", w.path, err)
	}
	if len(data) > MaxFileSize {
		return v, nil, fmt.Errorf("manifest: %s: larger than %d MiB", w.path, MaxFileSize>>20)
	}
	after, err := f.Stat()
	if err != nil {
		return v, nil, fmt.Errorf("manifest: %w", err)
	}
	if a := versionOf(after); !a.same(v) || int64(len(data)) != st.Size() {
		return a, nil, fmt.Errorf("manifest: %s: %w", w.path, errChanged)
	}
	return v, data, nil
}

// fileVersion identifies one version of the file by its size,
// modification time and identity (device and inode), or by why it could
// not be found.
type fileVersion struct {
	found bool // false when the file could not be stat'ed (and for the zero version)
	size  int64
	mtime time.Time
	id    fileID
	err   string // why not found
}

func (a fileVersion) same(b fileVersion) bool {
	if !a.found || !b.found {
		return a.found == b.found && a.err == b.err
	}
	return a.size == b.size && a.mtime.Equal(b.mtime) && a.id.same(b.id)
}

// stat returns the version of the file the path leads to now. It runs at
// every check, so it makes no garbage beyond the system call's (see
// statVersion).
func (w *Watcher) stat() fileVersion { return statVersion(w.path) }

// Run watches the file until ctx is done, calling apply (from Run's
// goroutine) with every new version that parses. It returns nil when ctx
// is done.
func (w *Watcher) Run(ctx context.Context, apply func(*Manifest)) error {
	var n *notifier
	var changed <-chan struct{}
	var errs <-chan error
	if w.notify {
		var err error
		if n, err = newNotifier(w.path); err != nil {
			w.log.Warn("config file: change notifications unavailable; polling only", "file", w.path, "poll", w.opts.Poll, "error", err)
		} else {
			defer n.close()
			changed, errs = n.C, n.Err
		}
	}
	poll := time.NewTicker(w.opts.Poll)
	defer poll.Stop()
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	// check says when to look again: arm the timer then.
	check := func() {
		if again := w.check(time.Now(), apply); again > 0 {
			settle.Reset(again)
		}
	}
	// A change made between Load and Run shows at the first check.
	check()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			w.rewatch(n)
			check()
		case err := <-errs:
			w.log.Warn("config file: change notifications stopped; polling only", "file", w.path, "poll", w.opts.Poll, "error", err)
			changed, errs = nil, nil
		case <-settle.C:
			check()
		case <-poll.C:
			if again := w.poll(n, time.Now(), apply); again > 0 {
				settle.Reset(again)
			}
		}
	}
}

// poll is what Run does on each WatchOptions.Poll tick, in case a
// notification was lost: it makes the watches fit the path again if they
// may not (see notifier.stale: the path leads to another file, a link on
// the way changed, a watch could not be added or went) and checks the
// file. It returns what check returns. With the file unchanged and the
// watches in place it neither resolves the path again nor re-adds the
// watches: an idle agent's polls then make (close to) no garbage.
func (w *Watcher) poll(n *notifier, now time.Time, apply func(*Manifest)) time.Duration {
	if n != nil && n.stale() {
		w.rewatch(n)
	}
	return w.check(now, apply)
}

func (w *Watcher) rewatch(n *notifier) {
	if n == nil {
		return
	}
	if err := n.update(); err != nil {
		w.log.Warn("config file: cannot watch a folder of the file; polling continues", "file", w.path, "error", err)
	}
}

// check looks at the file and deals with a new version once it has
// settled: applies it if it parses, rejects it otherwise. It returns how
// long to wait before the next check when a version is waiting to settle
// (0 when none is).
func (w *Watcher) check(now time.Time, apply func(*Manifest)) time.Duration {
	w.checks.Add(1)
	v := w.stat()
	if v.same(w.done) {
		w.cand = fileVersion{}
		return 0
	}
	if !v.same(w.cand) {
		w.cand, w.candSince, w.held = v, now, false
		return w.opts.Debounce
	}
	if wait := w.candSince.Add(w.opts.Debounce).Sub(now); wait > 0 {
		return wait
	}
	if !v.found {
		w.reject(now, v, nil, fmt.Errorf("manifest: %s", v.err))
		return 0
	}
	got, data, err := w.read()
	switch {
	case errors.Is(err, errChanged) || (err == nil && !got.same(v)):
		// Written to, or replaced, since the stat: wait for it to settle.
		w.cand, w.candSince, w.held = got, now, false
		return w.opts.Debounce
	case err != nil:
		if !got.found {
			got = v
		}
		w.reject(now, got, nil, err)
		return 0
	}
	sum := sha256.Sum256(data)
	if sum == w.inForceSum {
		w.done = v
		w.mu.Lock()
		back := w.status.LastEditRejected
		w.status.LastEditRejected, w.status.Problems = false, nil
		w.mu.Unlock()
		if back {
			w.log.Info("config file is back to the version in force", "file", w.path)
		}
		return 0
	}
	if sum == w.rejectedSum {
		w.done = v // rejected already, and still shown as rejected
		return 0
	}
	m, err := Parse(filepath.Base(w.path), data, w.opts.Options)
	if err != nil {
		w.reject(now, v, &sum, err)
		return 0
	}
	if what := sweeping(w.inForce, m); what != "" {
		if wait := w.candSince.Add(w.opts.Confirm).Sub(now); wait > 0 {
			if !w.held {
				w.held = true
				w.log.Warn("config file: this version "+what+"; it is applied only if the file stays unchanged for "+w.opts.Confirm.String()+
					" (a file being written looks like that)", "file", w.path)
			}
			return wait
		}
	}
	w.done, w.inForce, w.inForceSum, w.rejectedSum = v, m, sum, [sha256.Size]byte{}
	w.mu.Lock()
	w.status.Applied++
	w.status.AppliedAt = now
	w.status.LastEditRejected, w.status.Problems = false, nil
	w.mu.Unlock()
	w.logWarnings(m)
	w.log.Info("config file changed; applying it", "file", w.path,
		"workloads", len(m.Snapshot.Workloads()), "services", len(m.Snapshot.Services()), "nodes", len(m.Snapshot.Nodes()))
	apply(m)
	return 0
}

// reject records that version v (whose content has the hash sum, when it
// was read) is not applied because of err, and logs why.
func (w *Watcher) reject(now time.Time, v fileVersion, sum *[sha256.Size]byte, err error) {
	w.done = v
	w.rejectedSum = [sha256.Size]byte{}
	if sum != nil {
		w.rejectedSum = *sum
	}
	problems := problemLines(err)
	w.mu.Lock()
	w.status.Rejected++
	w.status.RejectedAt = now
	w.status.LastEditRejected, w.status.Problems = true, problems
	w.mu.Unlock()
	if !v.found {
		w.log.Warn("config file unavailable; keeping the last good config", "file", w.path, "error", err)
		return
	}
	var list ErrorList
	if !errors.As(err, &list) {
		w.log.Error("config file rejected; keeping the last good config", "file", w.path, "error", err)
		return
	}
	w.log.Error("config file rejected; keeping the last good config", "file", w.path, "problems", len(list))
	for i, e := range list {
		if i == maxErrors {
			w.log.Error("config file: more problems not shown", "file", w.path, "count", len(list)-maxErrors)
			break
		}
		w.log.Error(e.Error(), "problem", e)
	}
}

// problemLines renders err one problem a line.
func problemLines(err error) []string {
	var list ErrorList
	if !errors.As(err, &list) {
		return strings.Split(err.Error(), "\n")
	}
	out := make([]string, len(list))
	for i, e := range list {
		out[i] = e.Error()
	}
	return out
}

// sweeping says what m takes away entirely compared with old: every
// meshed pod, every object of a registered kind (MeshPolicy) or every mTLS
// annotation; "" when it keeps some of each that old had.
func sweeping(old, m *Manifest) string {
	if old == nil {
		return ""
	}
	var what []string
	if enrolled(old) > 0 && enrolled(m) == 0 {
		what = append(what, "takes every pod out of the mesh")
	}
	if len(old.Extra) > 0 && len(m.Extra) == 0 {
		var kinds []string
		for _, x := range old.Extra {
			if !slices.Contains(kinds, x.Kind.Kind) {
				kinds = append(kinds, x.Kind.Kind)
			}
		}
		what = append(what, "removes every "+strings.Join(kinds, " and every "))
	}
	if len(old.MTLS) > 0 && len(m.MTLS) == 0 {
		what = append(what, "removes every "+AnnotationMTLS+" annotation")
	}
	return strings.Join(what, ", ")
}

func enrolled(m *Manifest) int {
	n := 0
	for _, w := range m.Snapshot.Workloads() {
		if w.Enrolled {
			n++
		}
	}
	return n
}

func (w *Watcher) logWarnings(m *Manifest) {
	for _, e := range m.Warnings {
		w.log.Warn(e.Error(), "problem", e)
	}
}

// LogValue renders the problem as structured log attributes.
func (e *Error) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("file", e.Loc.File)}
	if e.Loc.Doc > 0 {
		attrs = append(attrs, slog.Int("document", e.Loc.Doc))
	}
	if e.Loc.Item > 0 {
		attrs = append(attrs, slog.Int("item", e.Loc.Item))
	}
	if e.Loc.Kind != "" {
		attrs = append(attrs, slog.String("kind", e.Loc.Kind))
	}
	if o := e.Loc.object(); o != "" {
		attrs = append(attrs, slog.String("object", o))
	}
	if e.Field != "" {
		attrs = append(attrs, slog.String("field", e.Field))
	}
	if e.Value != "" {
		attrs = append(attrs, slog.String("value", e.Value))
	}
	attrs = append(attrs, slog.String("msg", e.Msg))
	if len(e.Notes) > 0 {
		attrs = append(attrs, slog.Any("notes", e.Notes))
	}
	return slog.GroupValue(attrs...)
}

// maxLinks bounds the symbolic links followed while resolving the path.
const maxLinks = 40

// resolve follows the symbolic links of path. It returns the paths whose
// changes change the file: each symbolic link met on the way, named
// within a directory free of links, and the file it leads to; and the
// directories holding them. For a Kubernetes ConfigMap mount, where
// cluster.yaml → ..data/cluster.yaml and ..data → ..2026_12_06_…, these
// are cluster.yaml, ..data and ..2026_12_06_…/cluster.yaml.
func resolve(path string) (names, dirs []string) {
	add := func(name string) {
		if !slices.Contains(names, name) {
			names = append(names, name)
		}
		if d := filepath.Dir(name); !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	p, err := filepath.Abs(path)
	if err != nil {
		p = filepath.Clean(path)
	}
	for range maxLinks {
		link, target, ok := firstLink(p)
		if !ok {
			break
		}
		add(link)
		p = target
	}
	add(p)
	return names, dirs
}

// firstLink finds the first symbolic link among the components of the
// absolute path p. It returns the link (in a directory free of links) and
// p with the link replaced by its target; ok is false when p has no link,
// or when a component is missing (p then names it in a directory free of
// links as far as it exists).
func firstLink(p string) (link, target string, ok bool) {
	parts := strings.Split(strings.TrimPrefix(p, string(filepath.Separator)), string(filepath.Separator))
	cur := string(filepath.Separator)
	for i, part := range parts {
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(next)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		t, err := os.Readlink(next)
		if err != nil {
			return "", "", false
		}
		if !filepath.IsAbs(t) {
			t = filepath.Join(cur, t)
		}
		return next, filepath.Join(append([]string{t}, parts[i+1:]...)...), true
	}
	return "", "", false
}
