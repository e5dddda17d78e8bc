// Package report formats what `mantlet demo` and `mantlet bench` print:
// aligned tables, checks that passed or failed, and human units for rates,
// sizes, durations and ratios. It holds no measurement logic.
package report

import (
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// Table is a text table whose first column is left-aligned and whose other
// columns are right-aligned (they hold numbers), unless LeftAligned.
type Table struct {
	header []string
	rows   [][]string
	left   bool
}

// NewTable returns a table with the given column headers.
func NewTable(header ...string) *Table { return &Table{header: header} }

// LeftAligned makes every column left-aligned (for tables of names) and
// returns t.
func (t *Table) LeftAligned() *Table {
	t.left = true
	return t
}

// Add appends a row; missing cells print empty, extra cells are dropped.
func (t *Table) Add(cells ...string) {
	row := make([]string, len(t.header))
	copy(row, cells)
	t.rows = append(t.rows, row)
}

// Write prints the table with two spaces between columns, each line
// prefixed with indent.
func (t *Table) Write(w io.Writer, indent string) error {
	widths := make([]int, len(t.header))
	for _, row := range append([][]string{t.header}, t.rows...) {
		for i, c := range row {
			widths[i] = max(widths[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	line := func(row []string) {
		var l strings.Builder
		l.WriteString(indent)
		for i, c := range row {
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(c))
			if i > 0 {
				l.WriteString("  ")
			}
			if i == 0 || t.left {
				l.WriteString(c + pad)
			} else {
				l.WriteString(pad + c)
			}
		}
		out := l.String()
		if t.left {
			out = strings.TrimRight(out, " ")
		}
		b.WriteString(out)
		b.WriteByte('\n')
	}
	line(t.header)
	for _, row := range t.rows {
		line(row)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Checks prints checks as they are made and remembers the failed ones.
type Checks struct {
	w      io.Writer
	failed []string
}

// NewChecks returns a Checks that prints to w.
func NewChecks(w io.Writer) *Checks { return &Checks{w: w} }

// Check prints "  ok    what" or "  FAIL  what" and reports ok.
func (c *Checks) Check(ok bool, format string, args ...any) bool {
	what := fmt.Sprintf(format, args...)
	mark := "ok  "
	if !ok {
		mark = "FAIL"
		c.failed = append(c.failed, what)
	}
	fmt.Fprintf(c.w, "  %s  %s\n", mark, what)
	return ok
}

// Failed returns the failed checks in order.
func (c *Checks) Failed() []string { return slices.Clone(c.failed) }

// Err returns nil when every check passed, else an error that counts and
// names the failures.
func (c *Checks) Err() error {
	switch len(c.failed) {
	case 0:
		return nil
	case 1:
		return errors.New("1 check failed: " + c.failed[0])
	default:
		return fmt.Errorf("%d checks failed: %s", len(c.failed), strings.Join(c.failed, "; "))
	}
}

// Rate formats bytes per second in decimal units: "940 MB/s", "1.23 GB/s".
func Rate(bytesPerSecond float64) string { return decimal(bytesPerSecond, "B/s") }

// Bytes formats a byte count in decimal units: "0 B", "812 B", "3.4 MB".
func Bytes(n int64) string { return decimal(float64(n), "B") }

func decimal(v float64, unit string) string {
	prefixes := []string{"", "k", "M", "G", "T"}
	i := 0
	for math.Abs(v) >= 1000 && i < len(prefixes)-1 {
		v /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f %s", v, unit)
	}
	return Number(v) + " " + prefixes[i] + unit
}

// Number formats v with three significant digits (at least no decimals
// beyond that): 0.0123, 1.23, 12.3, 123, 12345.
func Number(v float64) string {
	a := math.Abs(v)
	switch {
	case a == 0 || math.IsNaN(v) || math.IsInf(v, 0):
		return fmt.Sprint(v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		digits := 2 - int(math.Floor(math.Log10(a)))
		return fmt.Sprintf("%.*f", digits, v)
	}
}

// Duration formats d in the unit that suits it, with three significant
// digits: "38.2 µs", "1.20 ms", "2.50 s".
func Duration(d time.Duration) string {
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%d ns", d.Nanoseconds())
	case d < time.Millisecond:
		return Number(float64(d)/float64(time.Microsecond)) + " µs"
	case d < time.Second:
		return Number(float64(d)/float64(time.Millisecond)) + " ms"
	default:
		return Number(d.Seconds()) + " s"
	}
}

// Ratio formats a/b as "2.45x", or "-" when either is not a positive
// finite number.
func Ratio(a, b float64) string {
	if !(a > 0 && b > 0) || math.IsInf(a, 0) || math.IsInf(b, 0) {
		return "-"
	}
	return Number(a/b) + "x"
}

// Percentile returns the p-th percentile (0 < p <= 100) of ds by the
// nearest-rank method, or 0 for no samples. It sorts ds in place.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	rank := int(math.Ceil(p / 100 * float64(len(ds))))
	return ds[min(max(rank, 1), len(ds))-1]
}
