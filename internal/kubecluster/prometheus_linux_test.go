package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/prombin"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// promScrapeInterval is the PodMonitor's interval in the test (the
// chart's default is 30s): short, so that rates have points soon.
const promScrapeInterval = "1s"

// promPort is Prometheus's port on the control plane's address.
const promPort = 9090

// podMonitor is the part of the chart's PodMonitor a scrape
// configuration is made from.
type podMonitor struct {
	Metadata struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		PodMetricsEndpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// chartPodMonitor renders the chart's PodMonitor with helm, as the
// release the harness installs would have it with podMonitor.enabled.
func chartPodMonitor(ctx context.Context, t *testing.T, helm string) podMonitor {
	t.Helper()
	repo, err := kubebin.RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	cmd := exec.CommandContext(ctx, helm, "template", MeshRelease, filepath.Join(repo, ChartDir), "-n", MeshNamespace,
		"--set", "podMonitor.enabled=true", "--set", "podMonitor.interval="+promScrapeInterval,
		"--show-only", "templates/podmonitor.yaml")
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template of the chart's PodMonitor: %v", err)
	}
	var pm podMonitor
	if err := yaml.Unmarshal(out, &pm); err != nil {
		t.Fatalf("the chart's PodMonitor: %v\n%s", err, out)
	}
	if len(pm.Spec.Selector.MatchLabels) == 0 || len(pm.Spec.PodMetricsEndpoints) != 1 {
		t.Fatalf("the chart's PodMonitor: want a matchLabels selector and one endpoint:\n%s", out)
	}
	return pm
}

// promLabel is how Prometheus's Kubernetes discovery spells a label name
// in its meta labels.
func promLabel(name string) string {
	return regexp.MustCompile(`[^a-zA-Z0-9_]`).ReplaceAllString(name, "_")
}

// prometheusConfig writes out what the Prometheus operator makes of the
// PodMonitor pm: Kubernetes discovery of the pods of its namespace, kept
// when they carry the selector's labels and have a container port named
// as the endpoint's, scraped at its path and interval. apiServer, ca and
// token are how discovery reaches the API server.
func prometheusConfig(pm podMonitor, apiServer, ca, token string) string {
	ep := pm.Spec.PodMetricsEndpoints[0]
	job := fmt.Sprintf("podMonitor/%s/%s/0", pm.Metadata.Namespace, pm.Metadata.Name)
	var b strings.Builder
	fmt.Fprintf(&b, `global:
  scrape_interval: %[1]s
  evaluation_interval: %[1]s
scrape_configs:
- job_name: %[2]s
  scrape_interval: %[1]s
  metrics_path: %[3]s
  kubernetes_sd_configs:
  - role: pod
    api_server: %[4]s
    tls_config: {ca_file: %[5]s}
    authorization: {credentials_file: %[6]s}
    namespaces: {names: [%[7]s]}
  relabel_configs:
`, ep.Interval, job, ep.Path, apiServer, ca, token, pm.Metadata.Namespace)
	keys := make([]string, 0, len(pm.Spec.Selector.MatchLabels))
	for k := range pm.Spec.Selector.MatchLabels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  - {source_labels: [__meta_kubernetes_pod_label_%s, __meta_kubernetes_pod_labelpresent_%s], regex: '(%s);true', action: keep}\n",
			promLabel(k), promLabel(k), regexp.QuoteMeta(pm.Spec.Selector.MatchLabels[k]))
	}
	fmt.Fprintf(&b, `  - {source_labels: [__meta_kubernetes_pod_container_port_name], regex: %s, action: keep}
  - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
  - {source_labels: [__meta_kubernetes_pod_container_name], target_label: container}
  - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
  - {target_label: job, replacement: %s/%s}
  - {target_label: endpoint, replacement: %s}
`, regexp.QuoteMeta(ep.Port), pm.Metadata.Namespace, pm.Metadata.Name, ep.Port)
	return b.String()
}

// prometheusAccount makes a ServiceAccount with what Prometheus's pod
// discovery needs in the mesh's namespace (get, list and watch pods) and
// returns a token of it. The test's cleanup removes them.
func prometheusAccount(ctx context.Context, t *testing.T, c *Cluster, ns string) string {
	t.Helper()
	admin := c.Admin()
	createNamespace(ctx, t, c, ns, nil)
	if _, err := admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "prometheus"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	const name = "prometheus-pod-discovery"
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}}}}
	if _, err := admin.RbacV1().Roles(MeshNamespace).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "prometheus"}}}
	if _, err := admin.RbacV1().RoleBindings(MeshNamespace).Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := admin.RbacV1().RoleBindings(MeshNamespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete rolebinding %s: %v", name, err)
		}
		if err := admin.RbacV1().Roles(MeshNamespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete role %s: %v", name, err)
		}
	})
	tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "prometheus",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// promClient asks the Prometheus API from the control plane's namespace.
type promClient struct {
	hc   *http.Client
	base string
}

// get decodes the data of an API answer into v.
func (p promClient) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var r struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, body)
	}
	if r.Status != "success" {
		return fmt.Errorf("%s: %s", path, r.Error)
	}
	return json.Unmarshal(r.Data, v)
}

// query evaluates q now and returns its series.
func (p promClient) query(ctx context.Context, q string) ([]json.RawMessage, error) {
	var d struct {
		Result []json.RawMessage `json:"result"`
	}
	err := p.get(ctx, "/api/v1/query?query="+url.QueryEscape(q), &d)
	return d.Result, err
}

// promTarget is an active target of /api/v1/targets.
type promTarget struct {
	ScrapePool string            `json:"scrapePool"`
	ScrapeURL  string            `json:"scrapeUrl"`
	Health     string            `json:"health"`
	LastError  string            `json:"lastError"`
	Labels     map[string]string `json:"labels"`
}

// requirePrometheus returns the Prometheus server of 'make
// prometheus-binaries'. Debian's prometheus package cannot stand in: it is
// built without Kubernetes service discovery ("field kubernetes_sd_configs
// not found in type config.ScrapeConfig"). Under CI=true its absence fails
// the test, else skips it.
func requirePrometheus(t *testing.T) prombin.Prometheus {
	t.Helper()
	p, err := prombin.Find(".")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	return p
}

// TestPrometheusScrapesTheAgentsAndTheDashboardHasData: Prometheus (built
// with Kubernetes discovery by 'make prometheus-binaries'), in the control plane's namespace, finds the agents through
// Kubernetes service discovery, with a ServiceAccount's token that may
// only get, list and watch the mesh namespace's pods, as the chart's
// PodMonitor describes them (the scrape configuration is made from the
// PodMonitor helm renders), and scrapes both; after meshed traffic, a
// policy denial and a rate-limited burst, every query of every panel of
// the shipped Grafana dashboard returns data.
func TestPrometheusScrapesTheAgentsAndTheDashboardHasData(t *testing.T) {
	c := meshed(t)
	prom := requirePrometheus(t)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()

	pm := chartPodMonitor(ctx, t, shared.helm)
	token := prometheusAccount(ctx, t, c, "monitoring")
	dir := t.TempDir()
	files := map[string][]byte{"ca.crt": c.API.CA, "token": []byte(token)}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := prometheusConfig(pm, c.API.URL, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "token"))
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cp := c.Testbed.ControlPlane()
	listen := net.JoinHostPort(cp.IP.String(), strconv.Itoa(promPort))
	start := time.Now()
	server, err := c.procs.start(procSpec{name: "prometheus", netns: cp.NS, log: filepath.Join(dir, "prometheus.log"),
		argv: []string{prom.Path,
			"--config.file=" + filepath.Join(dir, "prometheus.yml"),
			"--storage.tsdb.path=" + filepath.Join(dir, "data"),
			"--web.listen-address=" + listen,
		}})
	if err != nil {
		t.Fatal(err)
	}
	// Registered after TempDir's: Prometheus is killed before its folder
	// is removed.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the configuration:\n%s\nthe end of prometheus's log:\n%s", cfg, server.LogTail(30))
		}
		if err := server.Kill(); err != nil {
			t.Error(err)
		}
	})
	p := promClient{hc: &http.Client{Transport: &http.Transport{DialContext: cp.Dial}, Timeout: 10 * time.Second}, base: "http://" + listen}

	// Both agents are targets of the PodMonitor's job, and up.
	var targets []promTarget
	waitFor(ctx, t, "both agents scraped", func() (bool, string) {
		if !server.Running() {
			t.Fatal(server.ExitError())
		}
		var d struct {
			ActiveTargets []promTarget `json:"activeTargets"`
		}
		if err := p.get(ctx, "/api/v1/targets?state=active", &d); err != nil {
			return false, err.Error()
		}
		targets = targets[:0]
		up := 0
		for _, tg := range d.ActiveTargets {
			targets = append(targets, tg)
			if tg.Health == "up" {
				up++
			}
		}
		return len(targets) == len(c.Nodes) && up == len(c.Nodes), fmt.Sprintf("targets %+v", targets)
	})
	t.Logf("Prometheus started and scraped both agents in %s", time.Since(start).Round(time.Millisecond))
	var scraped []string
	for _, tg := range targets {
		scraped = append(scraped, tg.ScrapeURL)
		if tg.Labels["namespace"] != MeshNamespace || !strings.HasPrefix(tg.Labels["pod"], AgentDaemonSet+"-") {
			t.Errorf("target %s: labels %v, want an agent pod of %s", tg.ScrapeURL, tg.Labels, MeshNamespace)
		}
	}
	slices.Sort(scraped)
	var want []string
	for _, n := range c.Nodes {
		want = append(want, fmt.Sprintf("http://%s%s", net.JoinHostPort(n.Testbed.IP.String(), "15020"), pm.Spec.PodMetricsEndpoints[0].Path))
	}
	slices.Sort(want)
	if !slices.Equal(scraped, want) {
		t.Errorf("scraped %v, want every node's agent %v", scraped, want)
	}

	// Traffic for the panels: meshed connections, a burst beyond a rate
	// limit, denied ones.
	const ns = "metrics"
	echoAddr := meshedNamespace(ctx, t, c, ns)
	createPod(ctx, t, c, idlePod(ns, "client", c.Nodes[0].Name))
	client := waitPod(ctx, t, c, ns, "client", "Meshed", func(p *corev1.Pod) bool { return p.Status.PodIP != "" && meshedCondition(p) })
	dyn, err := dynamic.NewForConfig(c.API.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	mp := dyn.Resource(mkube.MeshPolicies).Namespace(ns)
	policy := func(name string, spec map[string]any) {
		t.Helper()
		u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "mantlet.io/v1alpha1", "kind": "MeshPolicy",
			"metadata": map[string]any{"namespace": ns, "name": name}, "spec": spec}}
		if _, err := mp.Create(ctx, u, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	traffic := func(d time.Duration) (ok, failed int) {
		for end := time.Now().Add(d); time.Now().Before(end) && ctx.Err() == nil; {
			if _, err := talk(ctx, c, client, echoAddr, "metrics"); err == nil {
				ok++
			} else {
				failed++
			}
		}
		return ok, failed
	}
	ok, failed := traffic(3 * time.Second)
	t.Logf("without a policy: %d connections ok, %d refused", ok, failed)
	if ok == 0 {
		t.Fatalf("no meshed connection went through (%d refused)", failed)
	}
	policy("rate", map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "echo"}},
		"rateLimit": map[string]any{"connectionsPerSecond": 2, "burst": 2}})
	ok, failed = traffic(6 * time.Second)
	t.Logf("with a rate limit of 2/s: %d connections ok, %d refused", ok, failed)
	policy("deny", map[string]any{"action": "DENY", "rules": []any{map[string]any{"to": map[string]any{"ports": []any{strconv.Itoa(echoPort)}}}}})
	ok, failed = traffic(3 * time.Second)
	t.Logf("with a DENY: %d connections ok, %d refused", ok, failed)
	if err := mp.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}

	// Every query of the dashboard, its variables set to "all" (the
	// dashboard's allValue), over ranges that hold the traffic (a minute
	// for $__rate_interval: the traffic ended seconds ago, on a loaded
	// machine maybe tens).
	repo, err := kubebin.RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	exprs := dashboardQueries(t, filepath.Join(repo, "deploy", "grafana-dashboard.json"))
	repl := strings.NewReplacer("$instance", ".*", "$namespace", ".*", "$__rate_interval", "1m", "$__range", "5m")
	missing := map[string]string{}
	peaks := map[string]float64{}
	deadline := time.Now().Add(30 * time.Second)
	for {
		clear(missing)
		for title, expr := range exprs {
			res, err := p.query(ctx, repl.Replace(expr))
			peak, zero := peakValue(res)
			peaks[title] = peak
			switch {
			case err != nil || len(res) == 0:
				missing[title] = fmt.Sprintf("%s: %d series, %v", expr, len(res), err)
			case zero && mustMove[strings.TrimRight(strings.TrimRight(title, "0123456789"), " #")]:
				missing[title] = fmt.Sprintf("%s: %d series, all 0 after traffic that should move it", expr, len(res))
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	for _, title := range slices.Sorted(maps.Keys(peaks)) {
		t.Logf("panel %q: largest value %g", title, peaks[title])
	}
	for _, title := range slices.Sorted(maps.Keys(missing)) {
		t.Errorf("panel %q returns no data: %s", title, missing[title])
	}
	t.Logf("%d dashboard queries evaluated, %d without data", len(exprs), len(missing))
}

// mustMove are the panels whose values the test's traffic (meshed
// connections, a rate limit, a DENY) makes non-zero; the others may
// rightly show 0: no eBPF drops, no access log lines lost, an idle
// connection pool, no SVID issued in the last 5 minutes.
var mustMove = map[string]bool{
	"Agents ready": true,
	"Bytes / s, source → destination identity":           true,
	"New connections / s, source → destination workload": true,
	"Connections by security policy":                     true,
	"Denials / s by policy and reason":                   true,
	"Decisions / s by action":                            true,
	"Rate-limit drops / s":                               true,
	"Denied sources (last hour)":                         true,
	"SVID expiry by identity":                            true,
}

// peakValue returns the largest value of an instant vector's series, and
// whether they are all 0.
func peakValue(res []json.RawMessage) (peak float64, zero bool) {
	zero = true
	for _, r := range res {
		var s struct {
			Value []any `json:"value"`
		}
		if json.Unmarshal(r, &s) != nil || len(s.Value) != 2 {
			continue
		}
		str, _ := s.Value[1].(string)
		v, err := strconv.ParseFloat(str, 64)
		if err != nil {
			continue
		}
		if v != 0 {
			zero = false
		}
		peak = max(peak, v)
	}
	return peak, zero
}

// dashboardQueries returns each panel's queries by "title #i".
func dashboardQueries(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func([]json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatal(err)
			}
			for i, tg := range p.Targets {
				if tg.Expr != "" {
					out[fmt.Sprintf("%s #%d", p.Title, i)] = tg.Expr
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	if len(out) == 0 {
		t.Fatal("the dashboard has no queries")
	}
	return out
}

// waitFor polls cond every 200 ms until it holds or ctx ends.
func waitFor(ctx context.Context, t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	var last string
	for {
		ok, why := cond()
		if ok {
			return
		}
		last = why
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v; last: %s", what, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
