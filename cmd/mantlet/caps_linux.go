package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// effectiveCaps returns this process's effective capabilities (CapEff of
// /proc/self/status); tests swap it.
var effectiveCaps = func() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapEff in /proc/self/status")
}
