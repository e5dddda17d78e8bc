//go:build !linux

package main

import "errors"

// effectiveCaps is unknown off Linux (the agent runs only there).
var effectiveCaps = func() (uint64, error) { return 0, errors.New("capabilities are a Linux notion") }
