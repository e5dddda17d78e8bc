package bpf

import (
	"fmt"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
)

// TestMain checks, after the tests, that they left no pins behind and
// touched no routing of the machine's own namespace.
func TestMain(m *testing.M) {
	code := m.Run()
	if os.Geteuid() == 0 {
		if entries, err := os.ReadDir(testPinRoot); err == nil && len(entries) > 0 {
			fmt.Fprintf(os.Stderr, "leak: %d pin directories left in %s\n", len(entries), testPinRoot)
			code = 1
		}
		if rules, err := netlink.RuleList(netlink.FAMILY_V4); err == nil {
			for _, r := range rules {
				if r.Table == DefaultRouteTable {
					fmt.Fprintf(os.Stderr, "leak: the machine's namespace has a rule for table %d: %v\n", r.Table, r)
					code = 1
				}
			}
		}
	}
	os.Exit(code)
}
