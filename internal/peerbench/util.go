package peerbench

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"github.com/mantlet/mantlet/internal/meshtest"
)

// randomToken returns n random bytes in hex.
func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// orDiscard returns w, or io.Discard when w is nil.
func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// logTail is how many lines of each agent's log explain a failure.
const logTail = 25

// printAgentTails prints the last lines of each agent's log, to explain a
// failure.
func printAgentTails(w io.Writer, m *meshtest.Mesh) {
	for _, n := range m.TB.Nodes() {
		lines := strings.Split(strings.TrimRight(m.AllLogs(n.Name), "\n"), "\n")
		if len(lines) > logTail {
			lines = lines[len(lines)-logTail:]
		}
		fmt.Fprintf(w, "--- last lines of the agent log of %s ---\n%s\n", n.Name, strings.Join(lines, "\n"))
	}
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
