package telemetry

import (
	"math"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
)

// gatherProcess returns the process_* series that c exports, by name.
func gatherProcess(t *testing.T, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		m := mf.GetMetric()[0]
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			out[mf.GetName()] = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			out[mf.GetName()] = m.GetGauge().GetValue()
		}
	}
	return out
}

// TestProcessCollectorAgreesWithPrometheus: the agent's process series
// are those of client_golang's process collector, with the same values
// (within what changes between two reads).
func TestProcessCollectorAgreesWithPrometheus(t *testing.T) {
	extra, err := os.Open(os.DevNull) // an open descriptor both must count
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	ours := gatherProcess(t, NewProcessCollector())
	theirs := gatherProcess(t, collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for name, want := range theirs {
		if name == "process_network_receive_bytes_total" || name == "process_network_transmit_bytes_total" {
			continue // the namespace's, not the process's: left out
		}
		got, ok := ours[name]
		if !ok {
			t.Errorf("%s is missing", name)
			continue
		}
		var tol float64
		switch name {
		case "process_resident_memory_bytes", "process_virtual_memory_bytes":
			tol = 0.05 * want // the heap moves between the reads
		case "process_cpu_seconds_total":
			tol = 0.05
		case "process_start_time_seconds":
			tol = 0.02 // both in USER_HZ ticks
		case "process_open_fds":
			tol = 1 // the other collector's own descriptor
		}
		if math.Abs(got-want) > tol {
			t.Errorf("%s = %v, client_golang's %v", name, got, want)
		}
	}
	if len(ours) != len(theirs)-2 {
		t.Errorf("%d series %v, want client_golang's but the network ones: %v", len(ours), ours, theirs)
	}
	if start := ours["process_start_time_seconds"]; time.Since(time.Unix(int64(start), 0)) > time.Hour || start > float64(time.Now().Unix()+1) {
		t.Errorf("process_start_time_seconds %v, not this test's start", start)
	}
}

// TestProcessCollectorMakesLittleGarbage: a collection allocates only
// the metrics it sends (MustNewConstMetric: four allocations each).
func TestProcessCollectorMakesLittleGarbage(t *testing.T) {
	c := NewProcessCollector()
	ch := make(chan prometheus.Metric, 16)
	collect := func() {
		c.Collect(ch)
		for len(ch) > 0 {
			<-ch
		}
	}
	collect()
	allocs := testing.AllocsPerRun(20, collect)
	theirs := collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})
	theirAllocs := testing.AllocsPerRun(20, func() {
		theirs.Collect(ch)
		for len(ch) > 0 {
			<-ch
		}
	})
	t.Logf("allocations a collection: %.0f, client_golang's %.0f", allocs, theirAllocs)
	if allocs > 40 {
		t.Errorf("a collection allocates %.0f times, want at most 40 (its 7 metrics take 28)", allocs)
	}
}

func BenchmarkProcessCollector(b *testing.B) {
	for _, c := range []struct {
		name string
		c    prometheus.Collector
	}{{"mantlet", NewProcessCollector()}, {"client_golang", collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}} {
		b.Run(c.name, func(b *testing.B) {
			ch := make(chan prometheus.Metric, 16)
			b.ReportAllocs()
			for b.Loop() {
				c.c.Collect(ch)
				for len(ch) > 0 {
					<-ch
				}
			}
		})
	}
}
