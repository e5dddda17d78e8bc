package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity/ca"
)

// agentFixture makes a CA directory and a cluster file with content.
func agentFixture(t *testing.T, content string) (caDir, config string) {
	t.Helper()
	dir := t.TempDir()
	caDir = filepath.Join(dir, "ca")
	if _, err := ca.Init(caDir, spiffeid.RequireTrustDomainFromString("example.org"), ca.Options{}); err != nil {
		t.Fatal(err)
	}
	config = filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(config, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return caDir, config
}

const goodCluster = `{apiVersion: v1, kind: Node, metadata: {name: node-1}, status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}}
`

func TestAgentCommandRefusesBadInvocations(t *testing.T) {
	caDir, config := agentFixture(t, goodCluster)
	_, badConfig := agentFixture(t, "{apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {nodeName: node-1}, status: {podIP: 198.19.1.300, hostIP: 198.18.0.1}}\n")
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no node name", []string{"--config", config, "--ca-dir", caDir}, 2, "mantlet agent: --node-name is required"},
		{"no config", []string{"--node-name", "node-1", "--ca-dir", caDir}, 2, "mantlet agent: --config (standalone), --kubeconfig or --kubernetes is required"},
		{"two sources", []string{"--node-name", "node-1", "--ca-dir", caDir, "--config", config, "--kubernetes"}, 2, "mantlet agent: give one of --config, --kubeconfig and --kubernetes"},
		{"no CA", []string{"--node-name", "node-1", "--config", config}, 2, "mantlet agent: --ca-dir is required"},
		{"an unknown mTLS mode", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--mtls-mode", "STRICTEST"}, 2,
			`mantlet agent: --mtls-mode: mTLS mode "STRICTEST": want STRICT or PERMISSIVE`},
		{"a bad log format", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--log-format", "xml"}, 2,
			`mantlet agent: --log-format "xml": want text or json`},
		{"no pending handshakes allowed", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--max-pending-handshakes", "0"}, 2,
			"mantlet agent: --max-pending-handshakes 0: want a positive number"},
		{"a negative descriptor reserve", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--fd-reserve", "-1"}, 2,
			"mantlet agent: --fd-reserve -1: want 0 (a quarter of the descriptor budget) or a positive number"},
		{"no handshake time", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--hbone-handshake-timeout", "0s"}, 2,
			"mantlet agent: --hbone-handshake-timeout 0s: want a positive duration"},
		{"a cluster file with an error", []string{"--node-name", "node-1", "--config", badConfig, "--ca-dir", caDir}, 1,
			`mantlet agent: cluster.yaml: document 1 (Pod default/a): status.podIP "198.19.1.300": not an IP address`},
		{"a missing cluster file", []string{"--node-name", "node-1", "--config", config + ".missing", "--ca-dir", caDir}, 1,
			"mantlet agent: manifest: open " + config + ".missing: no such file or directory"},
		{"a trust domain the CA does not serve", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--trust-domain", "cluster.local"}, 1,
			"mantlet agent: --trust-domain cluster.local: the CA in " + caDir + " is for trust domain example.org"},
		{"a CA directory without a CA", []string{"--node-name", "node-1", "--config", config, "--ca-dir", t.TempDir()}, 1,
			"no CA here (run 'mantlet ca init')"},
		{"the CNI plugin in standalone mode", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--cni"}, 2,
			"mantlet agent: --cni needs --kubernetes or --kubeconfig (the plugin's pods are read from the API server)"},
		{"a CNI bin folder without a configuration folder", []string{"--node-name", "node-1", "--kubeconfig", config, "--ca-dir", caDir, "--cni", "--cni-bin-dir", "/opt/cni/bin"}, 2,
			"mantlet agent: --cni-bin-dir and --cni-conf-dir go together"},
		{"a bad CNI DaemonSet", []string{"--node-name", "node-1", "--kubeconfig", config, "--ca-dir", caDir, "--cni", "--cni-daemonset", "mantlet"}, 2,
			`mantlet agent: --cni-daemonset "mantlet": want namespace/name`},
		{"a bad excluded CIDR", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--exclude-cidr", "10.0.0.0/40"}, 1,
			`mantlet agent: --exclude-cidr "10.0.0.0/40": want a prefix like 10.96.0.0/12`},
		{"a bad excluded port", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--exclude-port", "22,0"}, 1,
			`mantlet agent: --exclude-port "0": want a port from 1 to 65535`},
		{"a negative heap-profile rate", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--memory-profile-rate", "-1"}, 2,
			"mantlet agent: --memory-profile-rate -1: want 0 (off) or a number of bytes"},
		{"a bad log level", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--log-level", "loud"}, 1,
			`mantlet agent: --log-level "loud": want debug, info, warn or error`},
		{"an unknown issuer", []string{"--node-name", "node-1", "--config", config, "--issuer", "vault"}, 2, `mantlet agent: --issuer "vault": want ca, cluster-ca or spire`},
		{"the cluster CA without its address", []string{"--node-name", "node-1", "--config", config, "--issuer", "cluster-ca", "--ca-bundle", "b.pem"}, 2,
			"mantlet agent: --ca-address and --ca-bundle are required with --issuer cluster-ca"},
		{"the cluster CA and a CA directory", []string{"--node-name", "node-1", "--config", config, "--issuer", "cluster-ca", "--ca-address", "ca:15012", "--ca-bundle", "b.pem", "--ca-dir", caDir}, 2,
			"mantlet agent: --ca-dir is for --issuer ca"},
		{"a cluster CA flag without the cluster CA", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--ca-address", "ca:15012"}, 2,
			"mantlet agent: --ca-address needs --issuer cluster-ca"},
		{"the cluster CA with a missing bundle", []string{"--node-name", "node-1", "--config", config, "--issuer", "cluster-ca", "--ca-address", "ca:15012", "--ca-bundle", caDir + "/missing.pem"}, 1,
			"clusterca: trust bundle"},
		{"a service ID of another trust domain", []string{"--node-name", "node-1", "--config", config, "--issuer", "cluster-ca", "--ca-address", "ca:15012", "--ca-bundle", caDir + "/root.pem", "--ca-server-id", "spiffe://other.td/ca"}, 1,
			"--ca-server-id spiffe://other.td/ca is not of trust domain cluster.local"},
		{"SPIRE without its admin socket", []string{"--node-name", "node-1", "--config", config, "--issuer", "spire"}, 2,
			"mantlet agent: --spire-admin-socket is required with --issuer spire"},
		{"SPIRE and a CA", []string{"--node-name", "node-1", "--config", config, "--issuer", "spire", "--spire-admin-socket", "/run/spire/admin.sock", "--ca-dir", caDir}, 2,
			"mantlet agent: --ca-dir is for --issuer ca; with --issuer spire, SPIRE signs the SVIDs"},
		{"SPIRE and a lifetime", []string{"--node-name", "node-1", "--config", config, "--issuer", "spire", "--spire-admin-socket", "/run/spire/admin.sock", "--svid-ttl", "1h"}, 2,
			"mantlet agent: --svid-ttl does not apply with --issuer spire: SPIRE sets the lifetime of its SVIDs (the registration entry's X509-SVID TTL)"},
		{"a SPIRE socket without SPIRE", []string{"--node-name", "node-1", "--config", config, "--ca-dir", caDir, "--spire-admin-socket", "/run/spire/admin.sock"}, 2,
			"mantlet agent: --spire-admin-socket needs --issuer spire"},
		{"no SPIRE agent", []string{"--node-name", "node-1", "--config", config, "--issuer", "spire", "--spire-admin-socket", "/nonexistent/admin.sock",
			"--spire-workload-socket", "/nonexistent/api.sock", "--spire-wait", "100ms"}, 1,
			noSPIREAgentWant},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _, errb := testEnv()
			code := run(context.Background(), e, append([]string{"agent"}, tc.args...))
			if code != tc.code || !strings.Contains(errb.String(), tc.want) {
				t.Fatalf("exit %d, stderr:\n%s\nwant exit %d and %q", code, errb, tc.code, tc.want)
			}
		})
	}
}

// TestMemoryProfileRate: the agent samples its heap for profiles only when
// asked to (--memory-profile-rate), and leaves a rate that GODEBUG gave the
// runtime as it is.
func TestMemoryProfileRate(t *testing.T) {
	for _, tc := range []struct {
		godebug string
		flag    int
		rate    int
		ok      bool
	}{
		{"", 0, 0, true},
		{"", 524288, 524288, true},
		{"madvdontneed=1", 4096, 4096, true},
		{"memprofilerate=1", 0, 0, false},
		{"gctrace=1, memprofilerate=524288", 0, 0, false},
	} {
		rate, ok := memProfileRate(tc.godebug, tc.flag)
		if rate != tc.rate || ok != tc.ok {
			t.Errorf("GODEBUG=%q --memory-profile-rate %d: rate %d, set %v; want %d, %v", tc.godebug, tc.flag, rate, ok, tc.rate, tc.ok)
		}
	}
}

// asRoot makes the commands' root checks pass for the test (the code
// under test then needs no privilege of its own).
func asRoot(t *testing.T) {
	orig, origCaps := geteuid, effectiveCaps
	geteuid = func() int { return 0 }
	effectiveCaps = func() (uint64, error) { return ^uint64(0), nil }
	t.Cleanup(func() { geteuid, effectiveCaps = orig, origCaps })
}

func TestAgentCleanupOfANodeWithoutPinsSaysSo(t *testing.T) {
	asRoot(t)
	e, _, errb := testEnv()
	pins := filepath.Join(t.TempDir(), "node-1")
	if code := run(context.Background(), e, []string{"agent", "--cleanup", "--node-name", "node-1", "--pin-dir", pins}); code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, errb)
	}
	if want := "nothing pinned at " + pins + ": nothing removed"; !strings.Contains(errb.String(), want) || strings.Contains(errb.String(), "cleaned up") {
		t.Fatalf("stderr:\n%s\nwant it to say %q, and not that it cleaned up", errb, want)
	}
}

func TestAgentSaysItNeedsRoot(t *testing.T) {
	orig := geteuid
	geteuid = func() int { return 1000 }
	t.Cleanup(func() { geteuid = orig })
	for _, args := range [][]string{
		{"agent", "--node-name", "node-1", "--config", "cluster.yaml", "--ca-dir", "ca"},
		{"agent", "--cleanup", "--node-name", "node-1"},
	} {
		e, _, errb := testEnv()
		want := "mantlet agent: needs root: it loads eBPF programs, changes the node's routing and binds transparent sockets; run it as root (in Kubernetes the DaemonSet runs it as root with the capabilities NET_ADMIN, BPF and SYS_ADMIN)\n"
		if code := run(context.Background(), e, args); code != 1 || errb.String() != want {
			t.Errorf("%q: exit %d, stderr %q, want 1 and %q", args, code, errb, want)
		}
	}
}

// TestAgentSaysWhichCapabilitiesItLacks: root without the capabilities
// the agent uses (a DaemonSet whose list was trimmed) fails at once and
// names each missing one; SYS_ADMIN stands in for BPF, as in the kernel.
func TestAgentSaysWhichCapabilitiesItLacks(t *testing.T) {
	const all = 1<<capNetAdmin | 1<<capSysAdmin | 1<<capBPF
	for _, tc := range []struct {
		name string
		caps uint64
		want string // "" for no error
	}{
		{"all three", all, ""},
		{"without BPF, which SYS_ADMIN covers", all &^ (1 << capBPF), ""},
		{"without NET_ADMIN", all &^ (1 << capNetAdmin), "missing capabilities: CAP_NET_ADMIN (attach tc programs, install the routing rule, transparent sockets); give the agent's container the capabilities NET_ADMIN, BPF and SYS_ADMIN (the chart's securityContext does), or run it privileged"},
		{"without SYS_ADMIN", all &^ (1 << capSysAdmin), "missing capabilities: CAP_SYS_ADMIN (enter pods' network namespaces, mount bpffs); give the agent's container the capabilities NET_ADMIN, BPF and SYS_ADMIN (the chart's securityContext does), or run it privileged"},
		{"with none", 0, "missing capabilities: CAP_NET_ADMIN (attach tc programs, install the routing rule, transparent sockets), CAP_SYS_ADMIN (enter pods' network namespaces, mount bpffs), CAP_BPF (load eBPF programs and maps); give the agent's container the capabilities NET_ADMIN, BPF and SYS_ADMIN (the chart's securityContext does), or run it privileged"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := missingAgentCaps(tc.caps)
			if got := fmt.Sprint(err); (tc.want == "" && err != nil) || (tc.want != "" && got != tc.want) {
				t.Errorf("got %v\nwant %q", err, tc.want)
			}
		})
	}
	asRoot(t)
	effectiveCaps = func() (uint64, error) { return all &^ (1 << capNetAdmin), nil }
	e, _, errb := testEnv()
	if code := run(context.Background(), e, []string{"agent", "--node-name", "node-1", "--config", "cluster.yaml", "--ca-dir", "ca"}); code != 1 || !strings.Contains(errb.String(), "mantlet agent: missing capabilities: CAP_NET_ADMIN") {
		t.Errorf("exit %d, stderr %q; want 1 and the missing capability", code, errb)
	}
}

// noSPIREAgentWant is what --issuer spire says without a SPIRE agent: the
// Workload API's error in a build with SPIRE, how to get one without.
var noSPIREAgentWant = func() string {
	if spireBuilt {
		return "mantlet agent: spire: the mantlet agent's own SVID from the Workload API at /nonexistent/api.sock: "
	}
	return "mantlet agent: --issuer spire: this mantlet was built without SPIRE support; build it with -tags spire"
}()
