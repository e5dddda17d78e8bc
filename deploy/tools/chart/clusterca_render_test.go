package chart

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// clusterCAValues turn on the cluster CA.
func clusterCAValues() map[string]any {
	return map[string]any{"ca": map[string]any{"mode": "cluster"}, "trustDomain": "mesh.example"}
}

// TestClusterModeRendersTheCAAndAgentsWithoutTheKey: with ca.mode=cluster,
// the chart adds the CA's Deployment (2 replicas), Service, account and
// least-privilege roles, and the agents get the CA's address, the bundle
// ConfigMap and a projected token for the CA's audience instead of the
// CA's Secret.
func TestClusterModeRendersTheCAAndAgentsWithoutTheKey(t *testing.T) {
	objs := render(t, Options{Values: clusterCAValues()})
	want := []string{"ServiceAccount", "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
		"Role", "Role", "RoleBinding", "RoleBinding", "Service", "DaemonSet", "Deployment"}
	got := kinds(objs)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("rendered %v, want %v", got, want)
	}

	var dep appsv1.Deployment
	only(t, objs, "Deployment", &dep)
	if dep.Name != "mantlet-ca" || dep.Spec.Replicas == nil || *dep.Spec.Replicas != 2 || dep.Spec.Template.Spec.ServiceAccountName != "mantlet-ca" {
		t.Errorf("Deployment %s, replicas %v, account %s: want mantlet-ca, 2, mantlet-ca", dep.Name, dep.Spec.Replicas, dep.Spec.Template.Spec.ServiceAccountName)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	args := strings.Join(c.Args, " ")
	for _, a := range []string{"ca serve --kubernetes", "--trust-domain=mesh.example", "--agents=mantlet-system/mantlet-agent", "--secret=mantlet-ca",
		"--server-id=spiffe://mesh.example/ns/mantlet-system/sa/mantlet-ca", "--dns=mantlet-ca.mantlet-system.svc", "--listen=:15012", "--audience=mantlet-ca"} {
		if !strings.Contains(args, a) {
			t.Errorf("CA args %q lack %q", args, a)
		}
	}
	if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil || len(sc.Capabilities.Add) != 0 {
		t.Errorf("CA security context %+v: want read-only, no capability", sc)
	}
	if ps := dep.Spec.Template.Spec.SecurityContext; ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot {
		t.Error("the CA runs as root")
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
		t.Errorf("CA readiness probe %+v, want /readyz", p)
	}
	var svc corev1.Service
	only(t, objs, "Service", &svc)
	if svc.Name != "mantlet-ca" || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 15012 || svc.Spec.Selector["app.kubernetes.io/name"] != "mantlet-ca" {
		t.Errorf("Service %+v", svc)
	}

	for _, o := range objs {
		switch o.GetKind() {
		case "ClusterRole":
			var r rbacv1.ClusterRole
			b, _ := yaml.Marshal(o.Object)
			if err := yaml.UnmarshalStrict(b, &r); err != nil {
				t.Fatal(err)
			}
			if r.Name != "mantlet-ca" {
				checkLeastPrivilege(t, r) // the agent's, unchanged
				continue
			}
			got, _ := yaml.Marshal(r.Rules)
			want, _ := yaml.Marshal([]rbacv1.PolicyRule{
				{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
				{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list", "watch"}},
			})
			if string(got) != string(want) {
				t.Errorf("the CA's ClusterRole:\n%s\nwant:\n%s", got, want)
			}
		case "Role":
			var r rbacv1.Role
			b, _ := yaml.Marshal(o.Object)
			if err := yaml.UnmarshalStrict(b, &r); err != nil {
				t.Fatal(err)
			}
			for _, rule := range r.Rules {
				if slices.ContainsFunc(rule.Verbs, func(v string) bool { return v != "create" }) && len(rule.ResourceNames) != 1 {
					t.Errorf("the CA's Role grants %v on every %v", rule.Verbs, rule.Resources)
				}
				if slices.Contains(rule.Verbs, "delete") || slices.Contains(rule.Verbs, "list") {
					t.Errorf("the CA's Role grants %v", rule.Verbs)
				}
			}
		}
	}

	var ds appsv1.DaemonSet
	only(t, objs, "DaemonSet", &ds)
	ac := ds.Spec.Template.Spec.Containers[0]
	aargs := strings.Join(ac.Args, " ")
	for _, a := range []string{"--issuer=cluster-ca", "--ca-address=mantlet-ca.mantlet-system.svc:15012", "--ca-bundle=/etc/mantlet/ca-bundle/bundle.pem",
		"--token-file=/var/run/secrets/mantlet/ca/token", "--ca-server-id=spiffe://mesh.example/ns/mantlet-system/sa/mantlet-ca"} {
		if !strings.Contains(aargs, a) {
			t.Errorf("agent args %q lack %q", aargs, a)
		}
	}
	if strings.Contains(aargs, "--ca-dir") {
		t.Errorf("agent args %q still name a CA directory", aargs)
	}
	var token, bundle bool
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			t.Errorf("an agent mounts the Secret %s: no Secret belongs on a node in cluster mode", v.Secret.SecretName)
		}
		if v.ConfigMap != nil && v.ConfigMap.Name == "mantlet-trust-bundle" {
			bundle = true
		}
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if st := s.ServiceAccountToken; st != nil && st.Audience == "mantlet-ca" && st.Path == "token" {
					token = true
				}
			}
		}
	}
	if !token || !bundle {
		t.Errorf("agent volumes: projected token for mantlet-ca %v, bundle ConfigMap %v; want both", token, bundle)
	}
}

// TestCAFlagsExist checks that every flag the chart gives 'mantlet ca
// serve' is one of its flags, read from cmd/mantlet/ca_serve.go.
func TestCAFlagsExist(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root, "cmd", "mantlet", "ca_serve.go"))
	if err != nil {
		t.Fatal(err)
	}
	defined := map[string]bool{}
	for _, m := range regexp.MustCompile(`flags\.\w+\((?:&\w+, )?"([a-z0-9-]+)"`).FindAllSubmatch(b, -1) {
		defined[string(m[1])] = true
	}
	if !defined["agents"] || !defined["kubernetes"] {
		t.Fatalf("read no flags of 'ca serve' (found %d): has the flag code moved?", len(defined))
	}
	var dep appsv1.Deployment
	only(t, render(t, Options{Values: clusterCAValues()}), "Deployment", &dep)
	for _, a := range dep.Spec.Template.Spec.Containers[0].Args[2:] {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !defined[name] {
			t.Errorf("the chart passes %s, which 'mantlet ca serve' does not define", a)
		}
	}
}
