package bpf

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// ReadPinnedCounters reads the counters of the data path pinned in pinDir
// (a Config.PinDir), summed over CPUs, without opening the data path: it
// works while an agent holds the directory, and after it stopped.
func ReadPinnedCounters(pinDir string) (Counters, error) {
	path := filepath.Join(pinDir, mantletMapCounters)
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return Counters{}, fmt.Errorf("bpf: read pinned counters %s: %w", path, err)
	}
	defer m.Close()
	return readCounters(m)
}
