// Package scenario runs what `mantlet demo` and `mantlet bench` do: a mesh
// of real agents on the testbed (internal/meshtest), traffic between its
// pods, and a report of what was seen or measured (internal/report). The
// commands parse their flags and call Demo or Bench. Both need root.
package scenario

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/mantlet/mantlet/internal/meshtest"
)

// ErrInterrupted is returned by Demo and Bench when ctx was cancelled (the
// user pressed Ctrl-C) before they were done; everything they made is
// removed by then.
var ErrInterrupted = errors.New("interrupted; everything it made is removed")

// interrupted returns ErrInterrupted instead of err, which is then only a
// consequence, when ctx was cancelled.
func interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ErrInterrupted
	}
	return err
}

// randomToken returns n random bytes in hex.
func randomToken(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
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

// orDiscard returns w, or io.Discard when w is nil.
func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}
