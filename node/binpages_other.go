//go:build !linux

package node

// dropBinaryPages does nothing where the executable's mappings cannot be
// listed.
func dropBinaryPages() (int64, error) { return 0, nil }
