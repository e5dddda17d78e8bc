package peerbench

import (
	"math"
	"slices"
)

// Sides of a tunnel.
const (
	ClientSide = "client"
	ServerSide = "server"
)

// Better says which way a figure improves.
const (
	Higher = "higher"
	Lower  = "lower"
)

// figureDef describes one figure of the bench.
type figureDef struct {
	key, title, unit, better string
	// tunnel figures exist only for paths with tunnel processes (not
	// direct), one value per side.
	tunnel bool
	// profile figures exist only with --profile.
	profile bool
}

// The figures, in the order of the table and the JSON.
var figureDefs = []figureDef{
	{key: "throughput_1_stream", title: "throughput, 1 stream", unit: "bit/s", better: Higher},
	{key: "throughput_4_streams", title: "throughput, 4 streams", unit: "bit/s", better: Higher},
	{key: "cpu_per_gb_1_stream", title: "tunnel CPU per GB, 1 stream", unit: "s/GB", better: Lower, tunnel: true},
	{key: "cpu_per_gb_4_streams", title: "tunnel CPU per GB, 4 streams", unit: "s/GB", better: Lower, tunnel: true},
	{key: "echo_p50", title: "1-byte echo p50", unit: "s", better: Lower},
	{key: "echo_p99", title: "1-byte echo p99", unit: "s", better: Lower},
	{key: "cpu_per_echo", title: "tunnel CPU per echo round trip", unit: "s", better: Lower, tunnel: true},
	{key: "conns_per_second", title: "new connections per second, 8 clients", unit: "1/s", better: Higher},
	{key: "cpu_per_conn", title: "tunnel CPU per connection", unit: "s", better: Lower, tunnel: true},
	{key: "rss_start", title: "RSS at start (after one connection)", unit: "B", better: Lower, tunnel: true},
	{key: "rss_idle", title: "RSS idle, before the held connections", unit: "B", better: Lower, tunnel: true},
	{key: "rss_held", title: "RSS with the idle connections held", unit: "B", better: Lower, tunnel: true},
	{key: "rss_after", title: "RSS after they closed and the settle time", unit: "B", better: Lower, tunnel: true},
	{key: "syscalls_per_echo", title: "system calls per echo round trip (perf)", unit: "1", better: Lower, tunnel: true, profile: true},
	{key: "ctxsw_per_echo", title: "context switches per echo round trip (perf)", unit: "1", better: Lower, tunnel: true, profile: true},
}

// samples holds the values measured, per figure, side ("" for figures of
// the whole path) and path, one per round.
type samples map[string]map[string]map[string][]float64

func (s samples) add(fig, side, path string, v float64) {
	if s[fig] == nil {
		s[fig] = map[string]map[string][]float64{}
	}
	if s[fig][side] == nil {
		s[fig][side] = map[string][]float64{}
	}
	s[fig][side][path] = append(s[fig][side][path], v)
}

// Stat is a figure's values over the rounds.
type Stat struct {
	// Rounds holds one value per round, in order.
	Rounds []float64 `json:"rounds"`
	// Median, Min and Max summarise them.
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

func newStat(vs []float64) Stat {
	st := Stat{Rounds: slices.Clone(vs)}
	if len(vs) == 0 {
		return st
	}
	st.Median, st.Min, st.Max = median(vs), slices.Min(vs), slices.Max(vs)
	return st
}

// median returns the median of vs (the mean of the middle two for an even
// count).
func median(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ratioStat returns the ratios a[i]/b[i] of the rounds where both were
// measured and positive.
func ratioStat(a, b []float64) (Stat, bool) {
	var rs []float64
	for i := range min(len(a), len(b)) {
		if a[i] > 0 && b[i] > 0 {
			rs = append(rs, a[i]/b[i])
		}
	}
	if len(rs) == 0 {
		return Stat{}, false
	}
	return newStat(rs), true
}
