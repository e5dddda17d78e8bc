package telemetry

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// BuildInfo returns mantlet_build_info{version, goversion} = 1.
func BuildInfo() prometheus.Collector {
	v := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		v = bi.Main.Version
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "mantlet_build_info",
		Help:        "Always 1; the labels name the build.",
		ConstLabels: prometheus.Labels{"version": v, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}
