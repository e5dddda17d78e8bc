//go:build !linux

package privtest

import "testing"

// InMountNamespace needs Linux mount namespaces: elsewhere it skips t (or,
// under CI=true, fails it) and returns false.
func InMountNamespace(t *testing.T) bool {
	t.Helper()
	Require(t)
	if InCI() {
		t.Fatalf("%s needs Linux mount namespaces", t.Name())
	}
	t.Skipf("%s needs Linux mount namespaces", t.Name())
	return false
}
