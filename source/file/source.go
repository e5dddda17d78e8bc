package file

import (
	"context"
	"log/slog"
	"maps"
	"sync/atomic"

	"github.com/mantlet/mantlet/source"
)

// Source is the cluster file as a source.Source: Initial reads it (any
// problem stops the node), Run emits every later version that parses and
// passes validation, MeshPolicies included.
type Source struct {
	w   *Watcher
	gen atomic.Uint64
}

var _ source.Source = (*Source)(nil)

// New returns the source of the file at path. opts.Options.Kinds gets
// MeshPolicy added.
func New(path string, log *slog.Logger, opts WatchOptions) *Source {
	kinds := maps.Clone(opts.Options.Kinds)
	if kinds == nil {
		kinds = PolicyKinds()
	} else {
		maps.Copy(kinds, PolicyKinds())
	}
	opts.Options.Kinds = kinds
	return &Source{w: NewWatcher(path, log, opts)}
}

// Path returns the watched path.
func (s *Source) Path() string { return s.w.Path() }

// Initial reads the file once.
func (s *Source) Initial(context.Context) (*source.State, error) {
	m, err := s.w.Load()
	if err != nil {
		return nil, err
	}
	return s.state(m), nil
}

// Run watches the file and emits every version it applies.
func (s *Source) Run(ctx context.Context, publish func(*source.State)) error {
	return s.w.Run(ctx, func(m *Manifest) { publish(s.state(m)) })
}

// Status reports the watcher's reloads.
func (s *Source) Status() source.Status {
	rs := s.w.ReloadStatus()
	return source.Status{Kind: "file", Where: rs.File, Applied: rs.Applied, Rejected: rs.Rejected,
		AppliedAt: rs.AppliedAt, RejectedAt: rs.RejectedAt, LastEditRejected: rs.LastEditRejected, Problems: rs.Problems}
}

func (s *Source) state(m *Manifest) *source.State {
	return &source.State{Generation: s.gen.Add(1), Snapshot: m.Snapshot, Policies: Policies(m)}
}
