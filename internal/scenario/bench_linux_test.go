package scenario

import (
	"bytes"
	"context"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/privtest"
)

// TestBenchQuickPrintsEveryRowWithPositiveNumbers runs a short bench (what
// `mantlet bench --quick` runs) and checks that the table has every row,
// with numbers that make sense for both paths.
func TestBenchQuickPrintsEveryRowWithPositiveNumbers(t *testing.T) {
	privtest.Require(t)
	bin := mantletBinary(t)
	var out, errb bytes.Buffer
	opts := BenchOptions{Duration: time.Second, RoundTrips: 1000, ConnDuration: time.Second, MaxConns: 200000, Stdout: &out, Stderr: &errb}
	if err := Bench(context.Background(), bin, opts); err != nil {
		t.Fatalf("Bench: %v; stdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
	}
	table := out.String()
	cell := regexp.MustCompile(`\s{2,}`)
	rows := map[string][]string{}
	for _, line := range strings.Split(table, "\n") {
		if c := cell.Split(strings.TrimSpace(line), -1); len(c) == 4 {
			rows[c[0]] = c[1:]
		}
	}
	number := func(s string) float64 {
		f, err := strconv.ParseFloat(strings.Fields(s)[0], 64)
		if err != nil {
			t.Errorf("cell %q holds no number", s)
		}
		return f
	}
	for _, tt := range []struct {
		row             string
		directMayBeZero bool
	}{
		{"throughput, 1 stream, 1s", false},
		{"echo latency p50, 1000 round trips", false},
		{"echo latency p99", false},
		{"new connections per second, 1s", false},
		{"ztunnel CPU seconds per GB (both nodes)", true},
	} {
		c, ok := rows[tt.row]
		if !ok {
			t.Errorf("no row %q", tt.row)
			continue
		}
		if d := number(c[0]); d < 0 || d == 0 && !tt.directMayBeZero {
			t.Errorf("%s: direct = %q, want a positive number", tt.row, c[0])
		}
		if x := number(c[1]); x <= 0 {
			t.Errorf("%s: mantlet = %q, want a positive number", tt.row, c[1])
		}
		if !tt.directMayBeZero && !strings.HasSuffix(c[2], "x") {
			t.Errorf("%s: ratio = %q", tt.row, c[2])
		}
	}
	if !regexp.MustCompile(`Captured by node1's ztunnel: (\d+) of (\d+) connections through mantlet, 0 of \d+ direct`).MatchString(table) {
		t.Error("the report does not show that only the meshed connections were captured")
	}
	if t.Failed() {
		t.Logf("stdout:\n%s\nstderr:\n%s", table, errb.String())
	}
	prefix := regexp.MustCompile(`\(testbed (bench[0-9a-f]+)\)`).FindStringSubmatch(errb.String())
	if prefix == nil {
		t.Fatalf("stderr names no testbed:\n%s", errb.String())
	}
	if ns, _ := filepath.Glob("/run/netns/" + prefix[1] + "-*"); len(ns) > 0 {
		t.Errorf("namespaces left behind: %v", ns)
	}
	if pins, _ := filepath.Glob(filepath.Join(bpf.DefaultPinRoot, prefix[1]+"-*")); len(pins) > 0 {
		t.Errorf("pins left behind: %v", pins)
	}
}
