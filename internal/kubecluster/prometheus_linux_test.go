package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// scrapeInterval is Prometheus's, short so that rates have points soon.
const scrapeInterval = time.Second

// prometheusConfig is what the chart's PodMonitor asks of the Prometheus
// operator, written out: Kubernetes service discovery of the pods of the
// mantlet namespace, kept when they are the agent's, scraped on the
// container port named "metrics" at /metrics.
func prometheusConfig(apiServer, ca, cert, key string) string {
	return fmt.Sprintf(`global:
  scrape_interval: %s
  evaluation_interval: %s
scrape_configs:
- job_name: podMonitor/%s/%s
  metrics_path: /metrics
  kubernetes_sd_configs:
  - role: pod
    api_server: %s
    tls_config: {ca_file: %s, cert_file: %s, key_file: %s}
    namespaces: {names: [%s]}
  relabel_configs:
  - {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name], regex: mantlet, action: keep}
  - {source_labels: [__meta_kubernetes_pod_container_port_name], regex: metrics, action: keep}
  - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
  - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
  - {source_labels: [__meta_kubernetes_pod_node_name], target_label: node}
`, scrapeInterval, scrapeInterval, MeshNamespace, AgentDaemonSet, apiServer, ca, cert, key, MeshNamespace)
}

// TestPrometheusScrapesTheAgentsAndTheDashboardHasData: Debian's
// Prometheus, in the control plane's namespace, finds the agents through
// Kubernetes service discovery as the chart's PodMonitor describes them
// and scrapes both; after meshed traffic, a policy denial and a
// rate-limited burst, every query of every panel of the shipped Grafana
// dashboard returns data.
func TestPrometheusScrapesTheAgentsAndTheDashboardHasData(t *testing.T) {
	c := meshed(t)
	if _, err := exec.LookPath("prometheus"); err != nil {
		t.Fatalf("prometheus is not installed (apt-get install prometheus; .ci/run does): %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()

	dir := t.TempDir()
	kc, err := clientcmd.LoadFromFile(c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	auth := kc.AuthInfos[kc.Contexts[kc.CurrentContext].AuthInfo]
	files := map[string][]byte{"ca.crt": c.API.CA, "admin.crt": auth.ClientCertificateData, "admin.key": auth.ClientKeyData}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := prometheusConfig(c.API.URL, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key"))
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	prom := c.Command(ctx, "prometheus",
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:9090",
		"--web.console.templates=/etc/prometheus/consoles",
		"--web.console.libraries=/etc/prometheus/console_libraries")
	prom.Stdout, prom.Stderr = logf, logf
	prom.Cancel = func() error { return prom.Process.Kill() }
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = prom.Process.Kill()
		_ = prom.Wait()
		if t.Failed() {
			t.Logf("prometheus's log:\n%s", logTail(logf.Name(), 30))
		}
	}()
	hc := &http.Client{Transport: &http.Transport{DialContext: c.Testbed.ControlPlane().Dial}, Timeout: 10 * time.Second}
	query := func(q string) (int, error) {
		resp, err := hc.Get("http://127.0.0.1:9090/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		var r struct {
			Status string `json:"status"`
			Error  string `json:"error"`
			Data   struct {
				Result []json.RawMessage `json:"result"`
			} `json:"data"`
		}
		if err := json.Unmarshal(body, &r); err != nil {
			return 0, fmt.Errorf("%s: %s", resp.Status, body)
		}
		if r.Status != "success" {
			return 0, fmt.Errorf("%s", r.Error)
		}
		return len(r.Data.Result), nil
	}
	// Both agents are targets, and up.
	waitFor(ctx, t, "both agents scraped", func() (bool, string) {
		n, err := query(`sum(up{job="podMonitor/mantlet-system/mantlet-agent"})`)
		if err != nil {
			return false, err.Error()
		}
		m, err := query(`up{job="podMonitor/mantlet-system/mantlet-agent"} == 1`)
		return err == nil && n == 1 && m == len(c.Nodes), fmt.Sprintf("%d agents up (%v)", m, err)
	})

	// Traffic for the panels: meshed connections, a denied one, and a
	// burst beyond a rate limit.
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
		for end := time.Now().Add(d); time.Now().Before(end); {
			if _, err := talk(ctx, c, client, echoAddr, "metrics"); err == nil {
				ok++
			} else {
				failed++
			}
		}
		return ok, failed
	}
	policy("rate", map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "echo"}},
		"rateLimit": map[string]any{"connectionsPerSecond": 2, "burst": 2}})
	ok, failed := traffic(8 * time.Second)
	t.Logf("with a rate limit of 2/s: %d connections ok, %d refused", ok, failed)
	policy("deny", map[string]any{"action": "DENY", "rules": []any{map[string]any{}}})
	ok, failed = traffic(3 * time.Second)
	t.Logf("with a DENY: %d connections ok, %d refused", ok, failed)
	if err := mp.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}

	// Every query of the dashboard, with its variables set to "all".
	repo, err := kubebin.RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	exprs := dashboardQueries(t, filepath.Join(repo, "deploy", "grafana-dashboard.json"))
	repl := strings.NewReplacer("$instance", ".*", "$namespace", ".*", "$__rate_interval", "30s", "$__range", "5m")
	missing := map[string]string{}
	deadline := time.Now().Add(30 * time.Second)
	for {
		clear(missing)
		for title, expr := range exprs {
			n, err := query(repl.Replace(expr))
			if err != nil || n == 0 {
				missing[title] = fmt.Sprintf("%s: %d series, %v", expr, n, err)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	for title, why := range missing {
		t.Errorf("panel %q returns no data: %s", title, why)
	}
	t.Logf("%d dashboard queries evaluated", len(exprs))
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
