//go:build !linux

package file

import "errors"

// notifier would signal changes of the file; change notifications need
// Linux's inotify, so elsewhere the watcher polls.
type notifier struct {
	C   chan struct{}
	Err chan error
}

func newNotifier(string) (*notifier, error) {
	return nil, errors.New("manifest: change notifications need Linux (inotify)")
}

func (*notifier) update() error { return nil }

func (*notifier) stale() bool { return false }

func (*notifier) close() {}
