//go:build !linux

package bpf

// ReadPinnedCounters fails off Linux.
func ReadPinnedCounters(pinDir string) (Counters, error) { return Counters{}, errNotLinux }
