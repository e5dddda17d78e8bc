package peerbench

import (
	"testing"
	"time"
)

func TestParsersReadWhatTheKernelAndPerfPrint(t *testing.T) {
	stat := "4242 (nginx: worker (x)) S 1 4242 4242 0 -1 4194624 100 0 0 0 250 130 0 0 20 0 1 0 100 1000 200 18446744073709551615"
	if d, err := parseStatCPU(stat); err != nil || d != 3800*time.Millisecond {
		t.Errorf("parseStatCPU = %v, %v; want 3.8s (250+130 ticks)", d, err)
	}
	status := []byte("Name:\tghostunnel\nVmPeak:\t  100 kB\nVmRSS:\t   27648 kB\nThreads:\t7\n")
	if n, err := parseStatusRSS(status); err != nil || n != 27648<<10 {
		t.Errorf("parseStatusRSS = %d, %v; want 27 MiB", n, err)
	}
	if _, err := parseStatusRSS([]byte("Name:\tzombie\n")); err == nil {
		t.Error("parseStatusRSS without VmRSS: no error")
	}
	io := []byte("rchar: 1000\nwchar: 123456789\nsyscr: 3\nsyscw: 4\nread_bytes: 0\nwrite_bytes: 0\n")
	if n, err := parseIOWchar(io); err != nil || n != 123456789 {
		t.Errorf("parseIOWchar = %d, %v; want 123456789", n, err)
	}
	if _, err := parseIOWchar([]byte("rchar: 1\n")); err == nil {
		t.Error("parseIOWchar without wchar: no error")
	}
	perf := []byte("# started on ...\n\n619683,,raw_syscalls:sys_enter,2872356466,100.00,,\n<not counted>,,syscalls:sys_enter_tgkill,0,100.00,,\n216204,,context-switches,2872356466,100.00,,\n")
	c, err := parsePerfStat(perf)
	if err != nil || c["raw_syscalls:sys_enter"] != 619683 || c["context-switches"] != 216204 || len(c) != 2 {
		t.Errorf("parsePerfStat = %v, %v", c, err)
	}
}

func TestRatiosAreTakenRoundByRound(t *testing.T) {
	// Both paths slow down together in round 2: the ratio stays put,
	// which the ratio of the medians would not show.
	mantlet := []float64{2, 1, 2.2}
	peer := []float64{1, 0.5, 1.1}
	st, ok := ratioStat(mantlet, peer)
	if !ok || st.Median != 2 || st.Min != 2 || st.Max != 2 || len(st.Rounds) != 3 {
		t.Errorf("ratioStat = %+v, %v; want 2 in every round", st, ok)
	}
	if _, ok := ratioStat([]float64{1}, []float64{0}); ok {
		t.Error("a ratio to zero was made")
	}
	if st := newStat([]float64{3, 1, 2, 10}); st.Median != 2.5 || st.Min != 1 || st.Max != 10 {
		t.Errorf("newStat = %+v", st)
	}
}
