package chart

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// root is the repository's root, seen from this package.
const root = "../../.."

func chartDir() string { return filepath.Join(root, Dir) }

// render renders the chart with vals, failing t on an error.
func render(t *testing.T, opts Options) []*unstructured.Unstructured {
	t.Helper()
	m, err := Render(chartDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Objects(m)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// only returns the one object of kind in objs, decoded strictly into out
// (a field the type does not know is an error).
func only(t *testing.T, objs []*unstructured.Unstructured, kind string, out any) {
	t.Helper()
	var found []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one %s, rendered %d", kind, len(found))
	}
	b, err := yaml.Marshal(found[0].Object)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, out); err != nil {
		t.Fatalf("%s: %v", kind, err)
	}
}

func kinds(objs []*unstructured.Unstructured) []string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.GetKind())
	}
	return ks
}

// nonDefault returns values that turn on everything the defaults leave
// off (a new map each time: Helm's lint changes the maps it is given).
func nonDefault() map[string]any {
	return map[string]any{
		"createNamespace":     true,
		"image":               map[string]any{"repository": "registry.example/team/mantlet", "digest": "sha256:" + strings.Repeat("ab", 32), "pullPolicy": "Always"},
		"imagePullSecrets":    []any{map[string]any{"name": "pull"}},
		"ca":                  map[string]any{"secretName": "other-ca"},
		"trustDomain":         "mesh.example",
		"mtlsMode":            "STRICT",
		"defaultDeny":         true,
		"meshRootNamespace":   "mesh-root",
		"excludeCIDRs":        []any{"10.96.0.0/12", "169.254.169.254/32"},
		"excludePorts":        []any{22, 10250},
		"uplinks":             []any{"eth0"},
		"logLevel":            "debug",
		"logFormat":           "text",
		"drainTimeoutSeconds": 45,
		"extraArgs":           []any{"--access-log-open", "--svid-ttl=12h"},
		"resources":           map[string]any{"requests": map[string]any{"cpu": "250m", "memory": "256Mi"}, "limits": nil}, // null drops a default
		"nodeSelector":        map[string]any{"mesh": "yes"},
		"tolerations":         []any{map[string]any{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}},
		"affinity":            map[string]any{"nodeAffinity": map[string]any{"requiredDuringSchedulingIgnoredDuringExecution": map[string]any{"nodeSelectorTerms": []any{map[string]any{"matchExpressions": []any{map[string]any{"key": "mesh", "operator": "Exists"}}}}}}},
		"priorityClassName":   "",
		"updateStrategy":      map[string]any{"maxUnavailable": "20%"},
		"hostPID":             true,
		"privileged":          true,
		"podAnnotations":      map[string]any{"team": "net"},
		"podLabels":           map[string]any{"tier": "node"},
		"podMonitor":          map[string]any{"enabled": true, "interval": "15s", "labels": map[string]any{"release": "prometheus"}},
		"cni":                 map[string]any{"binDir": "/usr/libexec/cni", "confDir": "/etc/kubernetes/cni/net.d", "excludeNamespaces": []any{"infra"}, "timeoutSeconds": 10},
		"dashboard":           map[string]any{"enabled": true, "annotations": map[string]any{"grafana_folder": "mesh"}},
	}
}

func TestChartPassesHelmLint(t *testing.T) {
	for _, c := range []struct {
		name string
		vals map[string]any
	}{
		{"default values", nil},
		{"every option on", nonDefault()},
		{"the cluster CA", clusterCAValues()},
	} {
		t.Run(c.name, func(t *testing.T) {
			kv, err := common.ParseKubeVersion(KubeVersion)
			if err != nil {
				t.Fatal(err)
			}
			l := lint.RunAll(chartDir(), c.vals, Namespace, lint.WithKubeVersion(kv))
			for _, m := range l.Messages {
				if m.Severity > support.InfoSev {
					t.Error(m)
				} else {
					t.Log(m)
				}
			}
		})
	}
}

func TestDefaultsRenderTheAgentItsAccountAndLeastPrivilegeRBAC(t *testing.T) {
	objs := render(t, Options{})
	want := []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet"}
	if got := kinds(objs); !slices.Equal(got, want) {
		t.Errorf("default values render %v, want %v (no Namespace: helm install --create-namespace makes it; no PodMonitor or dashboard; the Role reads the agent's DaemonSet for its CNI plugin)", got, want)
	}
	for _, o := range objs {
		if ns := o.GetNamespace(); o.GetKind() != "ClusterRole" && o.GetKind() != "ClusterRoleBinding" && ns != Namespace {
			t.Errorf("%s %s: namespace %q, want the release's %q", o.GetKind(), o.GetName(), ns, Namespace)
		}
		if o.GetName() != "mantlet-agent" {
			t.Errorf("%s is named %q, want mantlet-agent", o.GetKind(), o.GetName())
		}
	}

	var ds appsv1.DaemonSet
	only(t, objs, "DaemonSet", &ds)
	spec := ds.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want the agent alone", len(spec.Containers))
	}
	c := spec.Containers[0]
	if c.Image != "registry.example/mantlet/mantlet:"+appVersion(t) || c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("image %s (%s), want registry.example/mantlet/mantlet:<appVersion> (IfNotPresent): what 'make image' names", c.Image, c.ImagePullPolicy)
	}
	args := strings.Join(c.Args, " ")
	for _, a := range []string{"agent --kubernetes ", "--node-name=$(NODE_NAME)", "--ca-dir=/etc/mantlet/ca", "--mtls-mode=PERMISSIVE",
		"--mesh-root-namespace=mantlet-system", "--drain-timeout=20s", "--log-format=json", "--log-level=info",
		"--cni --cni-socket=/run/mantlet/cni.sock --cni-bin-dir=/host/cni/bin --cni-conf-dir=/host/cni/net.d --cni-daemonset=mantlet-system/mantlet-agent --cni-exclude-namespace=kube-system,mantlet-system --cni-timeout=30s"} {
		if !strings.Contains(args, a) {
			t.Errorf("args %q lack %q", args, a)
		}
	}
	if len(c.Env) != 1 || c.Env[0].Name != "NODE_NAME" || c.Env[0].ValueFrom == nil || c.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("env %+v: want NODE_NAME from spec.nodeName", c.Env)
	}
	if !spec.HostNetwork || spec.HostPID || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, hostPID %v, dnsPolicy %s: want the node's network, not its PIDs, cluster DNS", spec.HostNetwork, spec.HostPID, spec.DNSPolicy)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g != 30 {
		t.Errorf("terminationGracePeriodSeconds %v, want 30: --drain-timeout 20s plus 10s", g)
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil || u.RollingUpdate.MaxUnavailable.String() != "1" {
		t.Errorf("update strategy %+v, want a rolling update with maxUnavailable 1", u)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v, want every taint tolerated", spec.Tolerations)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || port(c, p.HTTPGet.Port.String()) != 15021 {
		t.Errorf("readiness probe %+v, want GET :15021/healthz/ready", p)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Errorf("resources %+v: want cpu and memory requests", c.Resources)
	}

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext with capabilities")
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Error("the agent runs privileged by default; want its capability set")
	}
	var added []string
	for _, c := range sc.Capabilities.Add {
		added = append(added, string(c))
	}
	if !slices.Equal(added, []string{"NET_ADMIN", "BPF", "SYS_ADMIN"}) || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("capabilities add %v drop %v, want NET_ADMIN, BPF, SYS_ADMIN on top of none", added, sc.Capabilities.Drop)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("want a read-only root filesystem")
	}

	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	hostToContainer := corev1.MountPropagationHostToContainer
	for _, w := range []struct {
		path, host  string
		readOnly    bool
		propagation *corev1.MountPropagationMode
	}{
		{"/sys/fs/bpf", "/sys/fs/bpf", false, &hostToContainer},
		{"/run/mantlet", "/run/mantlet", false, nil},
		{"/run/netns", "/run/netns", true, &hostToContainer},
		{"/var/run/netns", "/var/run/netns", true, &hostToContainer},
		{"/host/cni/bin", "/opt/cni/bin", false, nil},
		{"/host/cni/net.d", "/etc/cni/net.d", false, nil},
	} {
		m, ok := mounts[w.path]
		switch {
		case !ok:
			t.Errorf("nothing mounted at %s", w.path)
		case hostPaths[m.Name] != w.host:
			t.Errorf("%s mounts %q, want the host's %s", w.path, hostPaths[m.Name], w.host)
		case m.ReadOnly != w.readOnly || !equalPtr(m.MountPropagation, w.propagation):
			t.Errorf("%s: readOnly %v propagation %v, want %v %v", w.path, m.ReadOnly, m.MountPropagation, w.readOnly, w.propagation)
		}
	}
	ca, ok := mounts["/etc/mantlet/ca"]
	if !ok || !ca.ReadOnly {
		t.Error("the CA is not mounted read-only at /etc/mantlet/ca")
	}
	for _, v := range spec.Volumes {
		if v.Name == ca.Name && (v.Secret == nil || v.Secret.SecretName != "mantlet-ca") {
			t.Errorf("the CA volume %+v is not the Secret mantlet-ca", v)
		}
	}

	var sa corev1.ServiceAccount
	only(t, objs, "ServiceAccount", &sa)
	if spec.ServiceAccountName != sa.Name {
		t.Errorf("the agent runs as %q, the chart's account is %q", spec.ServiceAccountName, sa.Name)
	}
	var role rbacv1.ClusterRole
	only(t, objs, "ClusterRole", &role)
	checkLeastPrivilege(t, role)
	var dsRole rbacv1.Role
	only(t, objs, "Role", &dsRole)
	if len(dsRole.Rules) != 1 || !slices.Equal(dsRole.Rules[0].Verbs, []string{"get"}) || !slices.Equal(dsRole.Rules[0].Resources, []string{"daemonsets"}) ||
		!slices.Equal(dsRole.Rules[0].ResourceNames, []string{ds.Name}) {
		t.Errorf("Role rules %+v, want get of the agent's own DaemonSet only", dsRole.Rules)
	}
	var binding rbacv1.ClusterRoleBinding
	only(t, objs, "ClusterRoleBinding", &binding)
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" ||
		binding.Subjects[0].Name != sa.Name || binding.Subjects[0].Namespace != Namespace {
		t.Errorf("binding %+v does not bind %s to the agent's account", binding, role.Name)
	}
}

// agentRules are the rules the agent needs: read what it builds its
// desired state from, patch the status it writes.
var agentRules = []rbacv1.PolicyRule{
	{APIGroups: []string{""}, Resources: []string{"namespaces", "pods", "nodes", "services"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{"mantlet.io"}, Resources: []string{"meshpolicies"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{"mantlet.io"}, Resources: []string{"meshpolicies/status"}, Verbs: []string{"patch"}},
	{APIGroups: []string{""}, Resources: []string{"pods/status"}, Verbs: []string{"patch"}},
}

func checkLeastPrivilege(t *testing.T, role rbacv1.ClusterRole) {
	t.Helper()
	if role.AggregationRule != nil {
		t.Error("the ClusterRole aggregates others")
	}
	for _, r := range role.Rules {
		for _, s := range slices.Concat(r.APIGroups, r.Resources, r.Verbs, r.ResourceNames, r.NonResourceURLs) {
			if strings.Contains(s, "*") {
				t.Errorf("rule %+v has a wildcard", r)
			}
		}
	}
	got, _ := yaml.Marshal(role.Rules)
	want, _ := yaml.Marshal(agentRules)
	if !bytes.Equal(got, want) {
		t.Errorf("ClusterRole rules:\n%s\nwant:\n%s", got, want)
	}
}

// TestTheCNIPluginCanBeTurnedOff: cni.enabled=false renders no CNI flag,
// no CNI folder and no Role.
func TestTheCNIPluginCanBeTurnedOff(t *testing.T) {
	objs := render(t, Options{Values: map[string]any{"cni": map[string]any{"enabled": false}}})
	if got, want := kinds(objs), []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}; !slices.Equal(got, want) {
		t.Errorf("rendered %v, want %v", got, want)
	}
	var ds appsv1.DaemonSet
	only(t, objs, "DaemonSet", &ds)
	c := ds.Spec.Template.Spec.Containers[0]
	for _, a := range c.Args {
		if strings.HasPrefix(a, "--cni") {
			t.Errorf("arg %s with the CNI plugin off", a)
		}
	}
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(m.MountPath, "/host/cni") {
			t.Errorf("mount %s with the CNI plugin off", m.MountPath)
		}
	}
}

func TestEveryValueReachesTheObjects(t *testing.T) {
	objs := render(t, Options{Release: "edge", Namespace: "edge-mesh", Values: nonDefault()})
	want := []string{"Namespace", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet", "PodMonitor"}
	if got := kinds(objs); !slices.Equal(got, want) {
		t.Fatalf("rendered %v, want %v", got, want)
	}
	var ns corev1.Namespace
	only(t, objs, "Namespace", &ns)
	if ns.Name != "edge-mesh" {
		t.Errorf("Namespace %q, want the release's", ns.Name)
	}

	var ds appsv1.DaemonSet
	only(t, objs, "DaemonSet", &ds)
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	if ds.Name != "edge-agent" || spec.ServiceAccountName != "edge-agent" {
		t.Errorf("DaemonSet %s runs as %s, want edge-agent: names follow the release", ds.Name, spec.ServiceAccountName)
	}
	if c.Image != "registry.example/team/mantlet@sha256:"+strings.Repeat("ab", 32) || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %s (%s): want the digest, Always", c.Image, c.ImagePullPolicy)
	}
	args := strings.Join(c.Args, " ")
	for _, a := range []string{"--mtls-mode=STRICT", "--mesh-root-namespace=mesh-root", "--drain-timeout=45s", "--log-format=text",
		"--log-level=debug", "--trust-domain=mesh.example", "--default-deny", "--exclude-cidr=10.96.0.0/12",
		"--exclude-cidr=169.254.169.254/32", "--exclude-port=22", "--exclude-port=10250", "--uplink=eth0",
		"--access-log-open", "--svid-ttl=12h", "--cni", "--cni-exclude-namespace=infra,edge-mesh", "--cni-timeout=10s", "--cni-daemonset=edge-mesh/edge-agent"} {
		if !slices.Contains(c.Args, a) {
			t.Errorf("args %q lack %q", args, a)
		}
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g != 55 {
		t.Errorf("terminationGracePeriodSeconds %v, want 55 (45s drain + 10s)", g)
	}
	if !spec.HostPID || spec.PriorityClassName != "" || spec.NodeSelector["mesh"] != "yes" || spec.Affinity == nil ||
		len(spec.Tolerations) != 1 || spec.Tolerations[0].Key != "dedicated" || len(spec.ImagePullSecrets) != 1 {
		t.Errorf("pod spec does not follow the values: %+v", spec)
	}
	if ds.Spec.Template.Labels["tier"] != "node" || ds.Spec.Template.Annotations["team"] != "net" {
		t.Errorf("pod metadata %+v lacks podLabels or podAnnotations", ds.Spec.Template.ObjectMeta)
	}
	if ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable.String() != "20%" {
		t.Errorf("maxUnavailable %s, want 20%%", ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable)
	}
	if r := c.Resources; r.Requests.Cpu().String() != "250m" || r.Limits != nil {
		t.Errorf("resources %+v, want the values' requests, the default limits dropped", r)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || !*sc.Privileged || sc.Capabilities != nil {
		t.Errorf("securityContext %+v: privileged wanted, without a capability list", sc)
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == "/sys/fs/bpf" && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
			t.Errorf("privileged: bpffs propagation %v, want Bidirectional (the agent's own mount of bpffs reaches the host)", m.MountPropagation)
		}
	}
	for _, v := range spec.Volumes {
		if v.Secret != nil && v.Secret.SecretName != "other-ca" {
			t.Errorf("CA Secret %q, want other-ca", v.Secret.SecretName)
		}
	}

	var pm unstructured.Unstructured
	only(t, objs, "PodMonitor", &pm.Object)
	sel, _, _ := unstructured.NestedStringMap(pm.Object, "spec", "selector", "matchLabels")
	for k, v := range sel {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("the PodMonitor selects %s=%s, the agent's pods have %q", k, v, ds.Spec.Template.Labels[k])
		}
	}
	eps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints")
	if len(eps) != 1 || port(c, eps[0].(map[string]any)["port"].(string)) != 15020 || eps[0].(map[string]any)["interval"] != "15s" {
		t.Errorf("PodMonitor endpoints %v, want the metrics port (15020) every 15s", eps)
	}
	if pm.GetNamespace() != "edge-mesh" || pm.GetLabels()["release"] != "prometheus" {
		t.Errorf("PodMonitor in %q with labels %v", pm.GetNamespace(), pm.GetLabels())
	}

	var cm corev1.ConfigMap
	only(t, objs, "ConfigMap", &cm)
	dashboard, err := os.ReadFile(filepath.Join(root, "deploy", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data["mantlet.json"] != strings.TrimRight(string(dashboard), "\n") {
		t.Error("the dashboard ConfigMap does not hold deploy/grafana-dashboard.json")
	}
	if cm.Labels["grafana_dashboard"] != "1" || cm.Annotations["grafana_folder"] != "mesh" {
		t.Errorf("dashboard labels %v annotations %v", cm.Labels, cm.Annotations)
	}
}

func TestHostPIDAddsPtraceOnly(t *testing.T) {
	var ds appsv1.DaemonSet
	only(t, render(t, Options{Values: map[string]any{"hostPID": true}}), "DaemonSet", &ds)
	var added []string
	for _, c := range ds.Spec.Template.Spec.Containers[0].SecurityContext.Capabilities.Add {
		added = append(added, string(c))
	}
	if !ds.Spec.Template.Spec.HostPID || !slices.Equal(added, []string{"NET_ADMIN", "BPF", "SYS_ADMIN", "SYS_PTRACE"}) {
		t.Errorf("hostPID: %v, capabilities %v: want the host's PIDs and SYS_PTRACE added", ds.Spec.Template.Spec.HostPID, added)
	}
}

func TestBadValuesAreRefusedWithTheirName(t *testing.T) {
	for _, c := range []struct {
		name string
		vals map[string]any
		want string
	}{
		{"an mTLS mode in lower case", map[string]any{"mtlsMode": "strict"}, `mtlsMode "strict": want PERMISSIVE or STRICT`},
		{"an unknown log level", map[string]any{"logLevel": "trace"}, `logLevel "trace": want debug, info, warn or error`},
		{"an unknown log format", map[string]any{"logFormat": "yaml"}, `logFormat "yaml": want json or text`},
		{"no drain", map[string]any{"drainTimeoutSeconds": 0}, "drainTimeoutSeconds: want at least 1"},
		{"no CA Secret", map[string]any{"ca": map[string]any{"secretName": ""}}, "ca.secretName is required"},
		{"an unknown CA mode", map[string]any{"ca": map[string]any{"mode": "vault"}}, `ca.mode "vault": want embedded or cluster`},
		{"no CA replica", map[string]any{"ca": map[string]any{"mode": "cluster", "cluster": map[string]any{"replicas": 0}}}, "ca.cluster.replicas: want at least 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Render(chartDir(), Options{Values: c.vals})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want one with %q", err, c.want)
			}
		})
	}
}

// TestAgentFlagsExist checks that every flag the chart gives 'mantlet
// agent' is one of its flags, read from cmd/mantlet's source.
func TestAgentFlagsExist(t *testing.T) {
	src, err := filepath.Glob(filepath.Join(root, "cmd", "mantlet", "*.go"))
	if err != nil || len(src) == 0 {
		t.Fatalf("cmd/mantlet: %v", err)
	}
	defined := map[string]bool{}
	def := regexp.MustCompile(`fs\.\w+\(&[^,]+, "([a-z0-9-]+)"`)
	for _, f := range src {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range def.FindAllSubmatch(b, -1) {
			defined[string(m[1])] = true
		}
	}
	if !defined["node-name"] || !defined["kubernetes"] {
		t.Fatalf("read no agent flags from cmd/mantlet (found %d): has the flag code moved?", len(defined))
	}
	vals := map[string]any{}
	for k, v := range nonDefault() {
		if k != "extraArgs" {
			vals[k] = v
		}
	}
	for _, o := range []Options{{}, {Values: vals}} {
		var ds appsv1.DaemonSet
		only(t, render(t, o), "DaemonSet", &ds)
		for _, a := range ds.Spec.Template.Spec.Containers[0].Args[1:] {
			name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			if !defined[name] {
				t.Errorf("the chart passes %s, which 'mantlet agent' does not define", a)
			}
		}
	}
}

func TestRenderedManifestIsCurrent(t *testing.T) {
	want, err := Manifest(root)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(root, ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the chart rendered with its default values: run 'make manifests' and commit it", ManifestFile)
	}
	objs, err := Objects(string(got))
	if err != nil {
		t.Fatal(err)
	}
	crd, err := HasCRD(root)
	if err != nil {
		t.Fatal(err)
	}
	want2 := []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet"}
	if crd {
		want2 = slices.Insert(want2, 0, "CustomResourceDefinition")
	} else {
		t.Logf("%s does not exist yet: the manifest holds no CRD", CRDFile)
	}
	if got := kinds(objs); !slices.Equal(got, want2) {
		t.Errorf("%s holds %v, want %v", ManifestFile, got, want2)
	}
}

func appVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir(), "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var meta struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &meta); err != nil || meta.AppVersion == "" {
		t.Fatalf("Chart.yaml: appVersion %q: %v", meta.AppVersion, err)
	}
	return meta.AppVersion
}

// port resolves a probe's or monitor's port, a number or a name of c's.
func port(c corev1.Container, p string) int32 {
	for _, cp := range c.Ports {
		if cp.Name == p {
			return cp.ContainerPort
		}
	}
	var n int32
	for _, r := range p {
		if r < '0' || r > '9' {
			return 0
		}
		n = n*10 + r - '0'
	}
	return n
}

func equalPtr[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// TestKubernetesAPIAddressReachesTheAgent: by default the agent reaches
// the API server through the kubernetes Service (no override in its
// environment); with kubernetesAPI.host (a cluster without kube-proxy)
// it gets KUBERNETES_SERVICE_HOST and _PORT, which client-go's in-cluster
// configuration reads.
func TestKubernetesAPIAddressReachesTheAgent(t *testing.T) {
	env := func(vals map[string]any) map[string]string {
		var ds appsv1.DaemonSet
		only(t, render(t, Options{Values: vals}), "DaemonSet", &ds)
		out := map[string]string{}
		for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
			out[e.Name] = e.Value
		}
		return out
	}
	if got := env(nil); got["KUBERNETES_SERVICE_HOST"] != "" || got["KUBERNETES_SERVICE_PORT"] != "" {
		t.Errorf("default values override the API server's address: %v", got)
	}
	got := env(map[string]any{"kubernetesAPI": map[string]any{"host": "192.0.2.10", "port": 6443}})
	if got["KUBERNETES_SERVICE_HOST"] != "192.0.2.10" || got["KUBERNETES_SERVICE_PORT"] != "6443" {
		t.Errorf("kubernetesAPI host 192.0.2.10 port 6443: agent environment %v", got)
	}
}
