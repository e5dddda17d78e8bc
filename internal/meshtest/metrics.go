package meshtest

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metrics are an agent's metric families by name, as Prometheus' own
// parser (expfmt) reads its /metrics.
type Metrics map[string]*dto.MetricFamily

// ParseMetrics parses the Prometheus text format.
func ParseMetrics(text string) (Metrics, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("meshtest: parse metrics: %w", err)
	}
	return mfs, nil
}

// Metrics scrapes node's agent (its :15020/metrics, from inside the node's
// namespace) and parses what it answers.
func (m *Mesh) Metrics(ctx context.Context, node string) (Metrics, error) {
	code, body, err := m.get(ctx, node, MetricsPort, "/metrics")
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("meshtest: metrics of %s: status %d", node, code)
	}
	if err != nil {
		return nil, err
	}
	// get trims the body; the parser wants the last line ended.
	ms, err := ParseMetrics(body + "\n")
	if err != nil {
		return nil, fmt.Errorf("meshtest: metrics of %s: %w", node, err)
	}
	return ms, nil
}

// Series is one series of a counter, gauge or untyped family.
type Series struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Series returns the series of family name whose labels include match
// (nil matches every series), in the order of the exposition. Histograms
// and summaries have none.
func (ms Metrics) Series(name string, match map[string]string) []Series {
	var out []Series
	for _, mt := range ms[name].GetMetric() {
		s := Series{Name: name, Labels: map[string]string{}}
		for _, lp := range mt.GetLabel() {
			s.Labels[lp.GetName()] = lp.GetValue()
		}
		switch {
		case mt.Counter != nil:
			s.Value = mt.GetCounter().GetValue()
		case mt.Gauge != nil:
			s.Value = mt.GetGauge().GetValue()
		case mt.Untyped != nil:
			s.Value = mt.GetUntyped().GetValue()
		default:
			continue
		}
		if includes(s.Labels, match) {
			out = append(out, s)
		}
	}
	return out
}

// Value returns the value of the series of family name whose labels are
// exactly labels, and whether there is one.
func (ms Metrics) Value(name string, labels map[string]string) (float64, bool) {
	for _, s := range ms.Series(name, labels) {
		if len(s.Labels) == len(labels) {
			return s.Value, true
		}
	}
	return 0, false
}

// Describe lists the series of family name, one a line, for failure
// messages.
func (ms Metrics) Describe(name string) string {
	var b strings.Builder
	for _, s := range ms.Series(name, nil) {
		fmt.Fprintf(&b, "  %s\n", s.Format(slices.Sorted(maps.Keys(s.Labels))...))
	}
	return b.String()
}

// Format writes the series as the text format does, with only the labels
// named in keys, in that order: name{k="v",...} value.
func (s Series) Format(keys ...string) string {
	var ls []string
	for _, k := range keys {
		if v, ok := s.Labels[k]; ok {
			ls = append(ls, fmt.Sprintf("%s=%q", k, v))
		}
	}
	v := strconv.FormatFloat(s.Value, 'g', -1, 64)
	if len(ls) == 0 {
		return s.Name + " " + v
	}
	return s.Name + "{" + strings.Join(ls, ",") + "} " + v
}

// includes reports whether labels hold every pair of match.
func includes(labels, match map[string]string) bool {
	for k, v := range match {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}
