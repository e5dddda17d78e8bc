//go:build !linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"syscall"
	"time"
)

// errNotLinux is what every operation returns off Linux.
var errNotLinux = fmt.Errorf("bpf: the eBPF data path needs Linux: %w", errors.ErrUnsupported)

// Datapath is the loaded and attached data path of one node. Off Linux it
// cannot be opened.
type Datapath struct{}

// Open fails off Linux.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Datapath, error) {
	return nil, errNotLinux
}

// Cleanup fails off Linux.
func Cleanup(ctx context.Context, pinDir string) (CleanupReport, error) {
	return CleanupReport{PinDir: pinDir}, errNotLinux
}

// EnrollPod fails off Linux.
func (d *Datapath) EnrollPod(p Pod) error { return errNotLinux }

// UnenrollPod fails off Linux.
func (d *Datapath) UnenrollPod(ifindex int) error { return errNotLinux }

// SetLocalPod fails off Linux.
func (d *Datapath) SetLocalPod(ip netip.Addr, on bool) error { return errNotLinux }

// AttachUplink fails off Linux.
func (d *Datapath) AttachUplink(ifname string) error { return errNotLinux }

// DetachUplink fails off Linux.
func (d *Datapath) DetachUplink(ifname string) error { return errNotLinux }

// Enrolled returns nothing off Linux.
func (d *Datapath) Enrolled() []int { return nil }

// SetListener fails off Linux.
func (d *Datapath) SetListener(slot Slot, l syscall.Conn) error { return errNotLinux }

// ClearListener fails off Linux.
func (d *Datapath) ClearListener(slot Slot) error { return errNotLinux }

// Counters fails off Linux.
func (d *Datapath) Counters() (Counters, error) { return Counters{}, errNotLinux }

// Status reports nothing attached off Linux.
func (d *Datapath) Status() Status { return Status{} }

// EnrolledPods is nil off Linux.
func (d *Datapath) EnrolledPods() []int { return nil }

// Ready is false off Linux.
func (d *Datapath) Ready() bool { return false }

// Created is false off Linux.
func (d *Datapath) Created() bool { return false }

// Remove fails off Linux.
func (d *Datapath) Remove(ctx context.Context) (CleanupReport, error) {
	return CleanupReport{}, errNotLinux
}

// Check reports nothing off Linux.
func (d *Datapath) Check() []Problem { return nil }

// Repair fails off Linux.
func (d *Datapath) Repair() ([]Problem, error) { return nil, errNotLinux }

// Repairs reports nothing off Linux.
func (d *Datapath) Repairs() map[Fault]uint64 { return nil }

// Watch fails off Linux.
func (d *Datapath) Watch(ctx context.Context, interval time.Duration) error { return errNotLinux }

// Close does nothing off Linux.
func (d *Datapath) Close() error { return nil }
