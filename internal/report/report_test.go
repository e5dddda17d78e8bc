package report

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestTableAlignsNumbersToTheRight(t *testing.T) {
	tb := NewTable("metric", "direct", "mantlet", "ratio")
	tb.Add("throughput", "2.31 GB/s", "610 MB/s", "0.26x")
	tb.Add("latency p50", "38.2 µs", "120 µs")
	var b bytes.Buffer
	if err := tb.Write(&b, "  "); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"  metric          direct   mantlet  ratio\n" +
		"  throughput   2.31 GB/s  610 MB/s  0.26x\n" +
		"  latency p50    38.2 µs    120 µs       \n"
	if b.String() != want {
		t.Fatalf("table:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestLeftAlignedTableTrimsLineEnds(t *testing.T) {
	tb := NewTable("node", "pod", "note").LeftAligned()
	tb.Add("node1", "shop/client", "meshed")
	tb.Add("node2", "legacy/legacy-server")
	var b bytes.Buffer
	if err := tb.Write(&b, "> "); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"> node   pod                   note\n" +
		"> node1  shop/client           meshed\n" +
		"> node2  legacy/legacy-server\n"
	if b.String() != want {
		t.Fatalf("table:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestChecksCountFailures(t *testing.T) {
	var b bytes.Buffer
	c := NewChecks(&b)
	if !c.Check(true, "marker absent from %d packets", 12) {
		t.Error("a passing check reported false")
	}
	if err := c.Err(); err != nil {
		t.Fatalf("Err after only passing checks = %v", err)
	}
	c.Check(false, "TLS 1.3 negotiated")
	c.Check(false, "no SNI")
	want := "  ok    marker absent from 12 packets\n  FAIL  TLS 1.3 negotiated\n  FAIL  no SNI\n"
	if b.String() != want {
		t.Errorf("printed:\n%s\nwant:\n%s", b.String(), want)
	}
	if err := c.Err(); err == nil || err.Error() != "2 checks failed: TLS 1.3 negotiated; no SNI" {
		t.Errorf("Err = %v", err)
	}
}

func TestUnits(t *testing.T) {
	tests := []struct{ got, want string }{
		{Rate(940e6), "940 MB/s"},
		{Rate(1.234e9), "1.23 GB/s"},
		{Rate(12), "12 B/s"},
		{Bytes(0), "0 B"},
		{Bytes(812), "812 B"},
		{Bytes(3_400_000), "3.40 MB"},
		{Number(0.01234), "0.0123"},
		{Number(0.5), "0.500"},
		{Number(12.34), "12.3"},
		{Number(12345), "12345"},
		{Duration(500 * time.Nanosecond), "500 ns"},
		{Duration(38200 * time.Nanosecond), "38.2 µs"},
		{Duration(1200 * time.Microsecond), "1.20 ms"},
		{Duration(2500 * time.Millisecond), "2.50 s"},
		{Ratio(3, 1.5), "2.00x"},
		{Ratio(1, 0), "-"},
		{Ratio(0, 1), "-"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

func TestPercentileByNearestRank(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- { // unsorted on purpose
		ds = append(ds, time.Duration(i)*time.Microsecond)
	}
	tests := []struct {
		p    float64
		want time.Duration
	}{
		{50, 50 * time.Microsecond},
		{99, 99 * time.Microsecond},
		{100, 100 * time.Microsecond},
		{0.1, 1 * time.Microsecond},
	}
	for _, tt := range tests {
		if got := Percentile(ds, tt.p); got != tt.want {
			t.Errorf("p%v = %v, want %v", tt.p, got, tt.want)
		}
	}
	if got := Percentile(nil, 50); got != 0 {
		t.Errorf("p50 of nothing = %v", got)
	}
	if !strings.HasPrefix(Duration(Percentile([]time.Duration{3 * time.Millisecond}, 99)), "3.00 ms") {
		t.Error("one sample is every percentile")
	}
}
