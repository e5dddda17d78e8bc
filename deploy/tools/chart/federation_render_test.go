package chart

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestFederationMountsTheBundlesAndFederatesEachDomain renders the chart
// with federation.bundles (the chart makes the ConfigMap) and with
// federation.existingConfigMap (the user's): either way each listed trust
// domain becomes a --federate flag naming its key's file in the mounted
// ConfigMap; without federation nothing of it is rendered.
func TestFederationMountsTheBundlesAndFederatesEachDomain(t *testing.T) {
	const pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
	for _, tc := range []struct {
		name      string
		fed       map[string]any
		configMap string // the ConfigMap mounted; "" for none
		rendered  bool   // the chart renders it
		domains   []string
	}{
		{"no federation", nil, "", false, nil},
		{"bundles in the values", map[string]any{"bundles": map[string]any{"c.example": pem, "b.example": pem}, "poll": "30s"},
			"edge-federation", true, []string{"b.example", "c.example"}},
		{"an existing ConfigMap", map[string]any{"existingConfigMap": "synced-bundles", "trustDomains": []any{"b.example"}},
			"synced-bundles", false, []string{"b.example"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vals := map[string]any{}
			if tc.fed != nil {
				vals["federation"] = tc.fed
			}
			objs := render(t, Options{Release: "edge", Namespace: "edge-mesh", Values: vals})
			var ds appsv1.DaemonSet
			only(t, objs, "DaemonSet", &ds)
			c := ds.Spec.Template.Spec.Containers[0]
			var got []string
			for _, a := range c.Args {
				if v, ok := strings.CutPrefix(a, "--federate="); ok {
					td, file, _ := strings.Cut(v, "=")
					if file != "/etc/mantlet/federation/"+td {
						t.Errorf("%s: want the file of key %s in the mounted ConfigMap", a, td)
					}
					got = append(got, td)
				}
			}
			if !slices.Equal(got, tc.domains) {
				t.Errorf("--federate flags for %v, want %v (args %q)", got, tc.domains, c.Args)
			}
			poll := slices.ContainsFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--federate-poll=") })
			if poll != (len(tc.domains) > 0) {
				t.Errorf("--federate-poll given: %v, want it with federation only", poll)
			}
			if tc.fed != nil && tc.fed["poll"] == "30s" && !slices.Contains(c.Args, "--federate-poll=30s") {
				t.Errorf("args %q lack --federate-poll=30s", c.Args)
			}
			i := slices.IndexFunc(ds.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == "federation" })
			mounted := slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
				return m.Name == "federation" && m.MountPath == "/etc/mantlet/federation" && m.ReadOnly
			})
			switch {
			case tc.configMap == "" && (i >= 0 || mounted):
				t.Error("a federation volume without federation")
			case tc.configMap != "" && (i < 0 || !mounted || ds.Spec.Template.Spec.Volumes[i].ConfigMap == nil || ds.Spec.Template.Spec.Volumes[i].ConfigMap.Name != tc.configMap):
				t.Errorf("the federation volume is not ConfigMap %s mounted read-only at /etc/mantlet/federation", tc.configMap)
			}
			var cms []corev1.ConfigMap
			for _, o := range objs {
				if o.GetKind() == "ConfigMap" && o.GetName() == "edge-federation" {
					var cm corev1.ConfigMap
					only(t, []*unstructured.Unstructured{o}, "ConfigMap", &cm)
					cms = append(cms, cm)
				}
			}
			if (len(cms) == 1) != tc.rendered {
				t.Fatalf("rendered %d federation ConfigMaps, want rendered=%v", len(cms), tc.rendered)
			}
			if tc.rendered && (cms[0].Namespace != "edge-mesh" || cms[0].Data["b.example"] != pem || cms[0].Data["c.example"] != pem) {
				t.Errorf("ConfigMap %s/%s holds %v; want each bundle under its trust domain", cms[0].Namespace, cms[0].Name, cms[0].Data)
			}
		})
	}
}
