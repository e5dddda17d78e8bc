package ca

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"
)

// A root rotation replaces the CA's root (and intermediate) without a
// moment in which two workloads distrust each other. It has three steps,
// each a new CA made from the previous one; between two steps every
// verifier must have picked up the trust bundle of the first:
//
//  1. Prepare makes the next root (and intermediate). The bundle carries
//     both roots; SVIDs are still signed under the old one. Wait until every
//     node trusts the new root.
//  2. Activate makes the next root the active one: SVIDs are now signed
//     under it, and nodes renew the SVIDs they hold under the old root early
//     (identity.Manager). The bundle still carries both. Wait until every
//     SVID has been renewed under the new root.
//  3. Finish drops every root but the active one from the bundle.
//
// Phase says where a CA stands.

// Phase is the state of a CA with regard to root rotation.
type Phase int

const (
	// PhaseIdle: one root, no rotation under way.
	PhaseIdle Phase = iota
	// PhasePrepared: the next root is in the bundle; the old one signs.
	PhasePrepared
	// PhaseActivated: the new root signs; older roots are still trusted.
	PhaseActivated
)

func (p Phase) String() string {
	switch p {
	case PhaseIdle:
		return "idle"
	case PhasePrepared:
		return "prepared"
	case PhaseActivated:
		return "activated"
	}
	return fmt.Sprintf("Phase(%d)", int(p))
}

// ErrRotationStep is wrapped by the errors of a rotation step taken out of
// order (Prepare twice, Activate without Prepare, Finish before Activate).
var ErrRotationStep = errors.New("rotation step out of order")

// Phase returns where the CA stands in a root rotation.
func (c *CA) Phase() Phase {
	switch {
	case c.next != nil:
		return PhasePrepared
	case len(c.roots) > 1:
		return PhaseActivated
	}
	return PhaseIdle
}

// NextRoot returns the root a prepared rotation will activate, or nil.
func (c *CA) NextRoot() *x509.Certificate {
	if c.next == nil {
		return nil
	}
	return c.next.root
}

// Prepare returns the CA with a next root (and an intermediate under it if
// the CA has one) of a fresh key, valid for Options.RootTTL from now: the
// bundle carries it after the roots already there; the active root still
// signs. A CA that is already prepared is refused (ErrRotationStep).
func (c *CA) Prepare() (*CA, error) {
	if c.next != nil {
		return nil, fmt.Errorf("ca: prepare: %w: a rotation is already prepared; activate it", ErrRotationStep)
	}
	next, err := newAuthority(c.td, c.opts, c.active.inter != nil)
	if err != nil {
		return nil, err
	}
	n := c.clone()
	n.next = next
	n.roots = append(n.roots, next.root)
	return n, nil
}

// Activate returns the CA whose active root is the one Prepare made: it
// signs from now on, and heads the bundle; the previous root stays in the
// bundle until Finish. A CA without a prepared rotation is refused
// (ErrRotationStep).
func (c *CA) Activate() (*CA, error) {
	if c.next == nil {
		return nil, fmt.Errorf("ca: activate: %w: no rotation is prepared (run prepare first)", ErrRotationStep)
	}
	n := c.clone()
	n.active, n.next = *c.next, nil
	n.roots = append([]*x509.Certificate{n.active.root}, slices.DeleteFunc(n.roots, n.active.root.Equal)...)
	return n, nil
}

// Finish returns the CA with only the active root in its bundle. A CA
// with a prepared rotation is refused (ErrRotationStep): activate it
// first. On a CA with one root it changes nothing.
func (c *CA) Finish() (*CA, error) {
	if c.next != nil {
		return nil, fmt.Errorf("ca: finish: %w: the prepared root is not active yet (run activate first)", ErrRotationStep)
	}
	n := c.clone()
	n.roots = []*x509.Certificate{n.active.root}
	return n, nil
}

// RetiredRoots returns the roots of the bundle that sign nothing any more
// (those Finish drops).
func (c *CA) RetiredRoots() []*x509.Certificate {
	var out []*x509.Certificate
	for _, r := range c.roots {
		if !r.Equal(c.active.root) && (c.next == nil || !r.Equal(c.next.root)) {
			out = append(out, r)
		}
	}
	return out
}

func (c *CA) clone() *CA {
	n := *c
	n.roots = slices.Clone(c.roots)
	return &n
}

// SigningExpiry returns when the active signing chain stops signing: the
// earlier expiry of the active root and its intermediate.
func (c *CA) SigningExpiry() time.Time {
	issuer, _ := c.active.signer()
	return issuer.NotAfter
}
