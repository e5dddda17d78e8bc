package ca

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultDirCheck is how often, at most, a Dir reads its directory again.
const DefaultDirCheck = time.Second

// Dir is a CA directory followed while it changes: every use reads the
// directory again if DefaultDirCheck has passed since the last read, and
// a changed directory that parses replaces the CA in use. So an agent
// started with --ca-dir picks up a rotation step ('mantlet ca rotate') or
// a replaced CA within seconds, without a restart. A directory that does
// not parse (half-written, a key of the wrong mode, another trust domain)
// leaves the last good CA in use; the error is logged once and kept
// (LastError) until a read succeeds.
//
// Dir implements identity.Issuer and the SigningRoot method the identity
// Manager uses to renew SVIDs early after a rotation. It is safe for
// concurrent use.
type Dir struct {
	path  string
	opts  Options
	log   *slog.Logger
	every time.Duration

	mu      sync.Mutex
	cur     *CA
	files   Files
	checked time.Time
	lastErr error
}

// OpenDir loads the CA in dir (see Load) and follows it. log, if not nil,
// receives a line for every change picked up and every failed read.
func OpenDir(dir string, opts Options, log *slog.Logger) (*Dir, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opts = opts.withDefaults()
	f, err := ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("ca: load %s: %w", dir, err)
	}
	c, err := parse(f, opts)
	if err != nil {
		return nil, fmt.Errorf("ca: load %s: %w", dir, err)
	}
	return &Dir{path: dir, opts: opts, log: log, every: DefaultDirCheck, cur: c, files: f, checked: opts.Now()}, nil
}

// CA returns the CA in use, reading the directory first if it is due.
func (d *Dir) CA() *CA {
	d.mu.Lock()
	defer d.mu.Unlock()
	if now := d.opts.Now(); now.Sub(d.checked) >= d.every || now.Before(d.checked) {
		d.checkLocked(now)
	}
	return d.cur
}

// Check reads the directory now and returns what kept a change from being
// picked up (nil when the directory is unchanged or was read).
func (d *Dir) Check() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.checkLocked(d.opts.Now())
	return d.lastErr
}

// LastError returns the error of the last read of the directory, nil if
// it succeeded.
func (d *Dir) LastError() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lastErr
}

func (d *Dir) checkLocked(now time.Time) {
	d.checked = now
	f, err := ReadDir(d.path)
	if err == nil && f.Equal(d.files) {
		d.setErrLocked(nil)
		return
	}
	var c *CA
	if err == nil {
		c, err = parse(f, d.opts)
	}
	if err == nil && c.td != d.cur.td {
		err = fmt.Errorf("it now holds a CA of trust domain %s, not %s; restart the agent to change trust domains", c.td, d.cur.td)
	}
	if err != nil {
		d.setErrLocked(fmt.Errorf("ca: reload %s: %w", d.path, err))
		return
	}
	old := d.cur
	d.cur, d.files = c, f
	d.setErrLocked(nil)
	d.log.Info("CA directory changed; using it", "dir", d.path, "phase", c.Phase().String(),
		"roots", len(c.roots), "active_root_changed", !old.active.root.Equal(c.active.root))
}

func (d *Dir) setErrLocked(err error) {
	if err != nil && (d.lastErr == nil || d.lastErr.Error() != err.Error()) {
		d.log.Warn("CA directory cannot be read; the last good CA stays in use", "dir", d.path, "error", err)
	}
	if err == nil && d.lastErr != nil {
		d.log.Info("CA directory readable again", "dir", d.path)
	}
	d.lastErr = err
}

// TrustDomain returns the CA's trust domain (it never changes).
func (d *Dir) TrustDomain() spiffeid.TrustDomain {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cur.td
}

// SignCSR signs with the CA in use (see CA.SignCSR).
func (d *Dir) SignCSR(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	return d.CA().SignCSR(ctx, csrDER, id, ttl)
}

// Bundle returns the trust bundle of the CA in use.
func (d *Dir) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	return d.CA().Bundle(ctx)
}

// SigningRoot returns the active root of the CA in use.
func (d *Dir) SigningRoot(ctx context.Context) (*x509.Certificate, error) {
	return d.CA().SigningRoot(ctx)
}
