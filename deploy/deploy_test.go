package deploy

import (
	"bytes"
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/telemetry"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

type pool struct{}

func (pool) PoolConns() int                        { return 0 }
func (pool) PoolStats() hbone.Stats                { return hbone.Stats{} }
func (pool) ServerKeyExchanges() map[string]uint64 { return nil }

type counters struct{}

func (counters) Counters() (bpf.Counters, error) { return bpf.Counters{}, nil }
func (counters) Repairs() map[bpf.Fault]uint64   { return nil }

type reloads struct{}

func (reloads) Status() source.Status { return source.Status{} }

// agentMetrics names every metric family the agent registers on :15020
// (the collectors node.Run registers), read from
// the collectors' descriptions, so series that do not exist yet count.
func agentMetrics(t *testing.T) map[string]bool {
	t.Helper()
	if clusterCA == nil {
		var err error
		if clusterCA, err = ca.New(identity.DefaultTrustDomain, ca.Options{}); err != nil {
			t.Fatal(err)
		}
	}
	o := telemetry.NewObserver(telemetry.ObserverOptions{AccessLog: events.NewWriter(nil, events.WriterOptions{})})
	cs := append(o.Collectors(),
		agent.NewCollector(nil, reloads{}, counters{}, func() map[string]uint64 { return nil }),
		telemetry.NewCertificates(func() []identity.CertInfo { return nil }, nil),
		telemetry.NewBundles(func() []identity.BundleInfo { return nil }),
		telemetry.NewPoolCollector(pool{}), telemetry.BuildInfo(),
		clusterca.Metrics(func() *ca.CA { return clusterCA }),
		collectors.NewGoCollector(), telemetry.NewProcessCollector())
	names := map[string]bool{}
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for _, c := range cs {
		ch := make(chan *prometheus.Desc, 256)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			m := fq.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read the name of %s", d)
			}
			names[m[1]] = true
		}
	}
	return names
}

// clusterCA stands behind the cluster CA's metric families (mantlet ca
// serve), which the alert rules read too.
var clusterCA *ca.CA

// builtin are series Prometheus makes itself.
var builtin = map[string]bool{"up": true}

var (
	promqlStrings = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	promqlBraces  = regexp.MustCompile(`\{[^}]*\}|\[[^\]]*\]`)
	promqlGroups  = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlIdent   = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promqlWords   = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true, "by": true,
		"without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}
)

// metricsIn returns the metric names a PromQL expression reads: the
// identifiers left once strings, label matchers, ranges and grouping
// clauses are gone, that are not functions, aggregations or keywords.
func metricsIn(expr string) []string {
	s := promqlStrings.ReplaceAllString(expr, `""`)
	s = promqlBraces.ReplaceAllString(s, " ")
	s = promqlGroups.ReplaceAllString(s, " ")
	var out []string
	for _, loc := range promqlIdent.FindAllStringIndex(s, -1) {
		name := s[loc[0]:loc[1]]
		rest := strings.TrimLeft(s[loc[1]:], " \t\n")
		prev := byte(' ')
		if loc[0] > 0 {
			prev = s[loc[0]-1]
		}
		// Skip keywords, functions, $variables and the units of durations
		// (5m).
		if promqlWords[name] || strings.HasPrefix(rest, "(") || prev == '$' || (prev >= '0' && prev <= '9') {
			continue
		}
		out = append(out, name)
	}
	return out
}

func TestMetricsIn(t *testing.T) {
	for _, c := range []struct{ expr, want string }{
		{`sum by (a, b) (rate(x_total{l="v",m=~"a|b"}[$__rate_interval]))`, "[x_total]"},
		{`min by (instance) (y) < 2 * 3600 and z offset 5m`, "[y z]"},
		{`topk(20, sum without (le) (increase(w{a="by (x)"}[1h])))`, "[w]"},
	} {
		if got := metricsIn(c.expr); strings.Join(got, " ") != strings.Trim(c.want, "[]") {
			t.Errorf("metricsIn(%s) = %v, want %s", c.expr, got, c.want)
		}
	}
}

// checkExprs fails for every metric that exprs read and the agent does
// not export, and returns the metrics read.
func checkExprs(t *testing.T, file string, exprs map[string]string) map[string]bool {
	t.Helper()
	known := agentMetrics(t)
	used := map[string]bool{}
	for where, expr := range exprs {
		ms := metricsIn(expr)
		if len(ms) == 0 {
			t.Errorf("%s: %s: reads no metric: %s", file, where, expr)
		}
		for _, m := range ms {
			used[m] = true
			if !known[m] && !builtin[m] {
				t.Errorf("%s: %s: metric %s does not exist (the agent exports no such family)", file, where, m)
			}
		}
	}
	return used
}

func TestDashboardReadsOnlyExistingMetrics(t *testing.T) {
	b, err := os.ReadFile("grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID    string `json:"uid"`
		Panels []struct {
			ID      int    `json:"id"`
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	exprs := map[string]string{}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for i, tg := range p.Targets {
			exprs[p.Title+" #"+string(rune('A'+i))] = tg.Expr
		}
	}
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(string); ok && strings.HasPrefix(q, "label_values(") {
			metric, _, _ := strings.Cut(strings.TrimPrefix(q, "label_values("), ",")
			exprs["variable "+v.Name] = metric
		}
	}
	used := checkExprs(t, "grafana-dashboard.json", exprs)
	// What the dashboard is for: traffic by identity, denials, certificate
	// expiry, eBPF drops.
	for _, m := range []string{"istio_tcp_received_bytes_total", "istio_tcp_connections_opened_total",
		"mantlet_policy_decisions_total", "mantlet_svid_expiry_seconds", "mantlet_datapath_packets_total"} {
		if !used[m] {
			t.Errorf("the dashboard does not show %s", m)
		}
	}
}

func TestAlertRulesReadOnlyExistingMetrics(t *testing.T) {
	b, err := os.ReadFile("alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				For         string            `json:"for"`
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(b, &f); err != nil {
		t.Fatalf("alerts.yaml: %v", err)
	}
	exprs := map[string]string{}
	var alerts []string
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			exprs[r.Alert] = r.Expr
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("alert %s: want a severity label and a summary", r.Alert)
			}
		}
	}
	checkExprs(t, "alerts.yaml", exprs)
	for _, a := range []string{"MantletCertificateExpiringSoon", "MantletDenialSpike", "MantletAgentNotReady", "MantletCASigningCertificateExpiring", "MantletCARefusals"} {
		if !slices.Contains(alerts, a) {
			t.Errorf("no alert %s", a)
		}
	}
	if !strings.Contains(exprs["MantletCertificateExpiringSoon"], "clamp_max(mantlet_svid_lifetime_seconds / 4, 2 * 3600)") {
		t.Errorf("MantletCertificateExpiringSoon should fire within 2h of expiry, or a quarter of the SVID's lifetime if shorter (admin.WarnWithin): %s", exprs["MantletCertificateExpiringSoon"])
	}
}

func TestDaemonSetRunsTheAgent(t *testing.T) {
	b, err := os.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds *appsv1.DaemonSet
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("daemonset.yaml: %v", err)
		}
		if meta.Kind == "DaemonSet" {
			ds = &appsv1.DaemonSet{}
			if err := yaml.UnmarshalStrict([]byte(doc), ds); err != nil {
				t.Fatalf("daemonset.yaml: DaemonSet: %v", err)
			}
		}
	}
	if ds == nil {
		t.Fatal("daemonset.yaml has no DaemonSet")
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	args := strings.Join(c.Args, " ")
	for _, want := range []string{"agent ", "--node-name=$(NODE_NAME)", "--config=", "--ca-dir="} {
		if !strings.Contains(args, want) {
			t.Errorf("agent args %q lack %q", args, want)
		}
	}
	if !spec.HostNetwork || c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the agent must run privileged in the node's network namespace")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != agent.ReadyPath || c.ReadinessProbe.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe = %+v, want %s on 15021", c.ReadinessProbe, agent.ReadyPath)
	}
	netnsMounted := false
	for _, m := range c.VolumeMounts {
		netnsMounted = netnsMounted || m.MountPath == "/run/netns" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationHostToContainer
	}
	if !netnsMounted && !spec.HostPID {
		t.Error("the agent cannot see the pods' network namespaces (mount the host's /run/netns with HostToContainer propagation, or hostPID)")
	}
	if ds.Spec.Template.Annotations["prometheus.io/port"] != "15020" {
		t.Error("metrics on 15020 are not announced for scraping")
	}
}

// TestChartShipsTheDashboard checks that the chart's copy of the dashboard
// (deploy/charts/mantlet/files, which its ConfigMap holds: Helm reads no
// file outside the chart) is this one.
func TestChartShipsTheDashboard(t *testing.T) {
	want, err := os.ReadFile("grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("charts/mantlet/files/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("charts/mantlet/files/grafana-dashboard.json differs from grafana-dashboard.json: copy it over ('make manifests' does)")
	}
}
