package manifest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Defaults of WatchOptions.
const (
	DefaultDebounce = 150 * time.Millisecond
	DefaultPoll     = 2 * time.Second
)

// WatchOptions tune a Watcher. The zero value uses the defaults.
type WatchOptions struct {
	// Options are handed to Parse.
	Options Options
	// Debounce is how long the file must stay quiet after a change
	// notification before it is read (editors write in several steps).
	Debounce time.Duration
	// Poll is how often the file is re-checked without a notification, for
	// file systems and set-ups where notifications are lost.
	Poll time.Duration
}

// Watcher loads the cluster file and reloads it when it changes. It
// watches the file's directory (so it sees editors' rename-into-place,
// kubectl-style rewrites and ConfigMap symlink swaps), waits for writes to
// settle, and re-checks the file periodically in case a notification is
// lost. A change that does not parse is logged problem by problem and
// otherwise ignored: the last good manifest stays in force.
type Watcher struct {
	path string
	log  *slog.Logger
	opts WatchOptions
	// notify is false in tests of the polling fallback.
	notify bool

	stat    os.FileInfo // of the content last read
	sum     [sha256.Size]byte
	missing bool // the file was unreadable at the last check, and that was logged

	applied, rejected atomic.Uint64
}

// Reloads counts the changed versions of the file that were applied and
// those that were rejected (they did not parse), since NewWatcher.
func (w *Watcher) Reloads() (applied, rejected uint64) {
	return w.applied.Load(), w.rejected.Load()
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
	return &Watcher{path: path, log: log, opts: opts, notify: true}
}

// Path returns the watched file's path.
func (w *Watcher) Path() string { return w.path }

// Load reads and parses the file now. Run compares later versions with the
// one Load read, so a change made between Load and Run is not missed. Load
// and Run must not run concurrently.
func (w *Watcher) Load() (*Manifest, error) {
	st, data, err := w.read()
	if err != nil {
		return nil, err
	}
	w.stat, w.sum = st, sha256.Sum256(data)
	m, err := Parse(filepath.Base(w.path), data, w.opts.Options)
	if err != nil {
		return nil, err
	}
	w.logWarnings(m)
	return m, nil
}

func (w *Watcher) read() (os.FileInfo, []byte, error) {
	f, err := os.Open(w.path)
	if err != nil {
		return nil, nil, fmt.Errorf("manifest: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("manifest: %w", err)
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("manifest: read %s: %w", w.path, err)
	}
	if len(data) > MaxFileSize {
		return nil, nil, fmt.Errorf("manifest: %s: larger than %d MiB", w.path, MaxFileSize>>20)
	}
	return st, data, nil
}

// Run watches the file until ctx is done, calling apply (from Run's
// goroutine) with every new version that parses. It returns nil when ctx
// is done.
func (w *Watcher) Run(ctx context.Context, apply func(*Manifest)) error {
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w.notify {
		fw, err := w.newNotifier()
		if err != nil {
			w.log.Warn("config file: change notifications unavailable; polling only", "file", w.path, "poll", w.opts.Poll, "error", err)
		} else {
			defer fw.Close()
			events, errs = fw.Events, fw.Errors
		}
	}
	poll := time.NewTicker(w.opts.Poll)
	defer poll.Stop()
	settle := time.NewTimer(0)
	if !settle.Stop() {
		<-settle.C
	}
	defer settle.Stop()
	// A change made between Load and Run shows at the first check.
	w.check(apply)
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle.Reset(w.opts.Debounce)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			w.log.Warn("config file: notification error; polling continues", "file", w.path, "error", err)
		case <-settle.C:
			w.check(apply)
		case <-poll.C:
			w.check(apply)
		}
	}
}

// newNotifier watches the file's directory and, when the file is a
// symbolic link, the directory of its target too.
func (w *Watcher) newNotifier() (*fsnotify.Watcher, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("manifest: watch: %w", err)
	}
	dirs := []string{filepath.Dir(w.path)}
	if target, err := filepath.EvalSymlinks(w.path); err == nil && filepath.Dir(target) != dirs[0] {
		dirs = append(dirs, filepath.Dir(target))
	}
	for _, d := range dirs {
		if err := fw.Add(d); err != nil {
			fw.Close()
			return nil, fmt.Errorf("manifest: watch %s: %w", d, err)
		}
	}
	return fw, nil
}

// check reads the file if it looks changed and applies it if it parses.
func (w *Watcher) check(apply func(*Manifest)) {
	st, err := os.Stat(w.path)
	if err != nil {
		if !w.missing {
			w.log.Warn("config file unavailable; keeping the last good config", "file", w.path, "error", err)
			w.missing = true
		}
		return
	}
	if w.missing {
		w.log.Info("config file is back", "file", w.path)
		w.missing = false
	}
	if w.stat != nil && sameVersion(w.stat, st) {
		return
	}
	st, data, err := w.read()
	if err != nil {
		w.log.Warn("config file unreadable; keeping the last good config", "file", w.path, "error", err)
		return
	}
	sum := sha256.Sum256(data)
	w.stat = st
	if bytes.Equal(sum[:], w.sum[:]) {
		return
	}
	w.sum = sum
	m, err := Parse(filepath.Base(w.path), data, w.opts.Options)
	if err != nil {
		w.rejected.Add(1)
		w.logProblems(err)
		return
	}
	w.applied.Add(1)
	w.logWarnings(m)
	w.log.Info("config file changed; applying it", "file", w.path,
		"workloads", len(m.Snapshot.Workloads()), "services", len(m.Snapshot.Services()), "nodes", len(m.Snapshot.Nodes()))
	apply(m)
}

func sameVersion(a, b os.FileInfo) bool {
	return a.Size() == b.Size() && a.ModTime().Equal(b.ModTime()) && os.SameFile(a, b)
}

func (w *Watcher) logProblems(err error) {
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
