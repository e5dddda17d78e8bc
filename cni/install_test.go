package cni

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const ptpList = `{
  "cniVersion": "0.4.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "subnet": "198.19.1.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`

func write(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func pluginTypes(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Name    string           `json:"name"`
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range list.Plugins {
		out = append(out, p["type"].(string))
	}
	return out
}

func TestInstallChainsThePluginLastInTheFirstNetworkOnce(t *testing.T) {
	dir := t.TempDir()
	first := write(t, dir, "10-ptp.conflist", ptpList)
	other := write(t, dir, "20-other.conflist", ptpList)
	write(t, dir, "README", "not a configuration")
	pc := PluginConfig{Socket: "/run/mantlet/cni.sock", ExcludeNamespaces: []string{"kube-system"}, TimeoutSeconds: 30}
	path, changed, err := Install(dir, pc)
	if err != nil || path != first || !changed {
		t.Fatalf("Install: %s changed=%v err=%v; want %s changed", path, changed, err, first)
	}
	if got := strings.Join(pluginTypes(t, first), ","); got != "ptp,portmap,mantlet-cni" {
		t.Errorf("plugins %s, want ptp,portmap,mantlet-cni", got)
	}
	if got := strings.Join(pluginTypes(t, other), ","); got != "ptp,portmap" {
		t.Errorf("a network the runtime does not use was changed: %s", got)
	}
	// Again (an agent restart): nothing changes, no second entry.
	if _, changed, err := Install(dir, pc); err != nil || changed {
		t.Errorf("second Install: changed=%v err=%v", changed, err)
	}
	// A new setting replaces the entry.
	pc.TimeoutSeconds = 10
	if _, changed, err := Install(dir, pc); err != nil || !changed {
		t.Errorf("Install with a new timeout: changed=%v err=%v", changed, err)
	}
	if got := strings.Join(pluginTypes(t, first), ","); got != "ptp,portmap,mantlet-cni" {
		t.Errorf("plugins %s after an update", got)
	}
	// The network plugin rewrites its file (as some do on restart): the
	// next Install puts mantlet back.
	write(t, dir, "10-ptp.conflist", ptpList)
	if _, changed, err := Install(dir, pc); err != nil || !changed {
		t.Errorf("Install after a rewrite: changed=%v err=%v", changed, err)
	}
	changedFiles, err := Uninstall(dir, "")
	if err != nil || len(changedFiles) != 1 || changedFiles[0] != first {
		t.Errorf("Uninstall: %v %v", changedFiles, err)
	}
	if got := strings.Join(pluginTypes(t, first), ","); got != "ptp,portmap" {
		t.Errorf("plugins %s after Uninstall", got)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestInstallRefusesWhatItCannotChainTo(t *testing.T) {
	empty := t.TempDir()
	if _, _, err := Install(empty, PluginConfig{}); !errors.Is(err, ErrNoNetwork) {
		t.Errorf("empty folder: %v, want ErrNoNetwork", err)
	}
	single := t.TempDir()
	conf := write(t, single, "10-ptp.conf", `{"cniVersion":"0.4.0","name":"k","type":"ptp"}`)
	_, _, err := Install(single, PluginConfig{})
	want := "cni: " + conf + " is a single-plugin configuration (no \"plugins\" list): mantlet's plugin can only be chained to a .conflist; convert it, or let the network plugin write one"
	if err == nil || err.Error() != want {
		t.Errorf("single plugin: %v, want %s", err, want)
	}
}

func TestInstallBinaryReplacesWholeOrNotAtAll(t *testing.T) {
	src := write(t, t.TempDir(), "mantlet-cni", "#!/bin/sh\nv1\n")
	bin := t.TempDir()
	if err := InstallBinary(src, bin); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(bin, PluginType))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v %v", st, err)
	}
	if err := InstallBinary(filepath.Join(bin, "missing"), bin); err == nil {
		t.Error("a missing source binary installed")
	}
	if _, err := Uninstall(t.TempDir(), bin); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(bin, PluginType)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("binary left after Uninstall: %v", err)
	}
}
