package meshtest

import (
	"strings"
	"testing"
)

const exposition = `# HELP istio_tcp_connections_opened_total Connections opened.
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_principal="spiffe://cluster.local/ns/shop/sa/client",response_flags="-"} 1
istio_tcp_connections_opened_total{reporter="destination",source_principal="spiffe://cluster.local/ns/shop/sa/client",response_flags="-"} 2
# TYPE mantlet_agent_ready gauge
mantlet_agent_ready 1
# TYPE odd_label untyped
odd_label{msg="a \"quoted\" word, and a comma",policy=""} 2.5
# TYPE rtt histogram
rtt_bucket{le="+Inf"} 4
rtt_sum 1
rtt_count 4
`

func TestMetricsFindSeriesByLabels(t *testing.T) {
	ms, err := ParseMetrics(exposition)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, family string
		match        map[string]string
		keys         []string
		want         []string // the matching series, formatted with keys
	}{
		{"a subset of the labels selects every series that has it", "istio_tcp_connections_opened_total",
			map[string]string{"response_flags": "-"}, []string{"reporter", "response_flags"},
			[]string{`istio_tcp_connections_opened_total{reporter="source",response_flags="-"} 1`, `istio_tcp_connections_opened_total{reporter="destination",response_flags="-"} 2`}},
		{"a label value selects its series", "istio_tcp_connections_opened_total",
			map[string]string{"reporter": "destination"}, []string{"reporter"},
			[]string{`istio_tcp_connections_opened_total{reporter="destination"} 2`}},
		{"a series without labels", "mantlet_agent_ready", nil, nil, []string{"mantlet_agent_ready 1"}},
		{"quoted label values and empty ones", "odd_label", map[string]string{"policy": ""}, []string{"msg", "policy"},
			[]string{`odd_label{msg="a \"quoted\" word, and a comma",policy=""} 2.5`}},
		{"no series of a family that is not there", "absent_total", nil, nil, nil},
		{"no series of a histogram", "rtt", nil, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, s := range ms.Series(tt.family, tt.match) {
				got = append(got, s.Format(tt.keys...))
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

func TestMetricsValueWantsTheExactLabels(t *testing.T) {
	ms, err := ParseMetrics(exposition)
	if err != nil {
		t.Fatal(err)
	}
	src := map[string]string{"reporter": "source", "source_principal": "spiffe://cluster.local/ns/shop/sa/client", "response_flags": "-"}
	if v, ok := ms.Value("istio_tcp_connections_opened_total", src); !ok || v != 1 {
		t.Errorf("the source series = %v, %v; want 1", v, ok)
	}
	if v, ok := ms.Value("istio_tcp_connections_opened_total", map[string]string{"reporter": "source"}); ok {
		t.Errorf("a subset of the labels found %v", v)
	}
	if v, ok := ms.Value("mantlet_agent_ready", map[string]string{}); !ok || v != 1 {
		t.Errorf("mantlet_agent_ready = %v, %v; want 1", v, ok)
	}
	if got, want := ms.Describe("mantlet_agent_ready"), "  mantlet_agent_ready 1\n"; got != want {
		t.Errorf("Describe = %q, want %q", got, want)
	}
}

func TestParseMetricsRefusesWhatIsNotTheTextFormat(t *testing.T) {
	if _, err := ParseMetrics("not a sample line\n"); err == nil || !strings.HasPrefix(err.Error(), "meshtest: parse metrics: ") {
		t.Errorf("error = %v", err)
	}
}
