package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mantlet/mantlet/internal/proc"
	"github.com/mantlet/mantlet/internal/testbed"
)

// The programs a node runs besides the Kubernetes ones, from Debian's
// packages (containerd, runc, containernetworking-plugins, iptables) and
// util-linux (nsenter, unshare, mount).
var nodeTools = []string{"containerd", "ctr", "containerd-shim-runc-v2", "runc", "iptables", "iptables-restore", "nsenter", "unshare", "mount"}

// CNIBinDir is where Debian's containernetworking-plugins installs the
// plugins.
const CNIBinDir = "/usr/lib/cni"

// checkTools says which of the programs a node needs are missing, and how
// to install them. Only kube-proxy's nftables mode needs nft.
func checkTools(proxyMode string) error {
	var missing []string
	tools := nodeTools
	if proxyMode == ProxyNFTables {
		tools = append(slices.Clip(tools), "nft")
	}
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	for _, p := range []string{"ptp", "bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(CNIBinDir, p)); err != nil {
			missing = append(missing, filepath.Join(CNIBinDir, p))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("kubecluster: missing %s: apt-get install containerd runc containernetworking-plugins iptables nftables util-linux (.ci/run does)", strings.Join(missing, ", "))
	}
	return nil
}

// nodeMounts are the folders that a node gets fresh in its mount
// namespace, as a machine of its own has them: network namespaces of its
// pods, containerd's shim sockets, the agent's admin sockets, CNI's cache,
// the kubelet's log links, the kubelet's device-plugin socket (whose
// path no flag moves: two nodes' kubelets starting together each clear
// that folder and bind it, and one then failed with "address already in
// use"), and the CNI bin and configuration folders where the chart
// installs mantlet's CNI plugin (the usual paths, as a node has them).
// bpffs gets a fresh instance too, so that the agents' pins are the
// node's alone and go with it.
var nodeMounts = []string{"/run/netns", "/run/containerd", "/run/mantlet", "/var/lib/cni", "/var/log/containers", "/var/lib/kubelet/device-plugins", NodeCNIBinDir, NodeCNIConfDir}

// The CNI folders of a node, in its mount namespace: Debian's plugins
// linked into the bin folder, the node's network configuration list in the
// configuration folder.
const (
	NodeCNIBinDir  = "/opt/cni/bin"
	NodeCNIConfDir = "/etc/cni/net.d"
)

// mountSetup is the script that prepares a node's mount namespace; conf
// is the node's CNI network configuration list.
func mountSetup(conf string) string {
	var b strings.Builder
	for _, d := range nodeMounts {
		fmt.Fprintf(&b, "mkdir -p %s && mount -t tmpfs -o mode=0755 kubecluster %s\n", d, d)
	}
	fmt.Fprintf(&b, "ln -s %s/* %s/\n", CNIBinDir, NodeCNIBinDir)
	fmt.Fprintf(&b, "cp %s %s/\n", strconv.Quote(conf), NodeCNIConfDir)
	b.WriteString("mount -t bpf bpffs /sys/fs/bpf\n")
	// Shared, as on a machine booted by systemd: containerd refuses
	// HostToContainer volumes from a private mount. The namespace stays a
	// slave of the machine's, so nothing propagates back.
	b.WriteString("mount --make-rshared /\n")
	return b.String()
}

// startNode configures and starts a node's containerd, imports the images
// into it, then starts its kubelet and kube-proxy (none with ProxyNone).
func (c *Cluster) startNode(ctx context.Context, n *Node, cni, proxyMode string, archives []string) error {
	for _, d := range []string{"containerd/root", "containerd/state", "runc", "cni", "ipam", "kubelet", "pod-logs", "opt"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return fmt.Errorf("kubecluster: node %s: %w", n.Name, err)
		}
	}
	kc, err := os.ReadFile(c.Kubeconfig)
	if err != nil {
		return fmt.Errorf("kubecluster: %w", err)
	}
	files := map[string][]byte{
		"containerd.toml":             []byte(containerdConfig(n)),
		"cni/10-kubecluster.conflist": cniConfig(n, cni),
		"kubelet.yaml":                []byte(kubeletConfig(n, c.API.CAFile())),
		"kube-proxy.yaml":             []byte(kubeProxyConfig(n, proxyMode)),
		"kubeconfig":                  kc,
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(n.Dir, name), b, 0o600); err != nil {
			return fmt.Errorf("kubecluster: node %s: %w", n.Name, err)
		}
	}
	// A route for the Services' virtual IPs, as a machine's default route
	// gives it: a packet the node itself sends (a hostNetwork pod, such as
	// mantlet's agent, calling the kubernetes Service) needs a route before
	// kube-proxy's OUTPUT rules translate its destination. Pods' packets
	// arrive from their veths and are translated on the way in.
	if out, err := n.Testbed.Command(ctx, "ip", "route", "replace", testbed.ServiceCIDR.String(), "dev", n.Testbed.Uplink).CombinedOutput(); err != nil {
		return fmt.Errorf("kubecluster: node %s: route to the Services: %w: %s", n.Name, err, strings.TrimSpace(string(out)))
	}
	procs, err := createCgroups(n.CgroupRoot)
	if err != nil {
		return err
	}
	n.containerd, err = c.procs.start(procSpec{
		name: n.Name + " containerd", netns: n.Testbed.NS, cgroup: procs,
		newMountNS: true, setup: mountSetup(filepath.Join(n.Dir, "cni/10-kubecluster.conflist")),
		log:  filepath.Join(n.Dir, "containerd.log"),
		argv: []string{"containerd", "--config", filepath.Join(n.Dir, "containerd.toml")},
	})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := c.pollProcess(wctx, n.containerd, "containerd's socket "+n.Containerd, func() (bool, string) {
		conn, err := net.Dial("unix", n.Containerd)
		if err != nil {
			return false, err.Error()
		}
		conn.Close()
		return true, ""
	}); err != nil {
		return err
	}
	for _, a := range archives {
		cmd := exec.CommandContext(ctx, "ctr", "--address", n.Containerd, "--namespace", "k8s.io", "images", "import", "--no-unpack=false", a)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("kubecluster: node %s: import %s: %w: %s", n.Name, filepath.Base(a), err, strings.TrimSpace(string(out)))
		}
	}
	mnt := fmt.Sprintf("/proc/%d/ns/mnt", n.containerd.Pid())
	n.kubelet, err = c.procs.start(procSpec{
		name: n.Name + " kubelet", netns: n.Testbed.NS, mountNS: mnt, cgroup: procs,
		log: filepath.Join(n.Dir, "kubelet.log"),
		argv: []string{c.bins.Kubelet,
			"--config=" + filepath.Join(n.Dir, "kubelet.yaml"),
			"--kubeconfig=" + filepath.Join(n.Dir, "kubeconfig"),
			"--root-dir=" + filepath.Join(n.Dir, "kubelet"),
			"--hostname-override=" + n.Name,
			"--node-ip=" + n.Testbed.IP.String(),
			"--v=1",
		},
	})
	if err != nil || proxyMode == ProxyNone {
		return err
	}
	n.proxy, err = c.procs.start(procSpec{
		name: n.Name + " kube-proxy", netns: n.Testbed.NS, mountNS: mnt, cgroup: procs,
		log:  filepath.Join(n.Dir, "kube-proxy.log"),
		argv: []string{c.bins.KubeProxy, "--config=" + filepath.Join(n.Dir, "kube-proxy.yaml")},
	})
	return err
}

// pollProcess is poll for one process: it fails as soon as p exits.
func (c *Cluster) pollProcess(ctx context.Context, p *proc.Process, what string, ready func() (bool, string)) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	last := "nothing yet"
	for {
		ok, why := ready()
		if ok {
			return nil
		}
		last = why
		select {
		case <-p.Exited():
			return fmt.Errorf("kubecluster: waiting for %s: %w", what, p.ExitError())
		case <-ctx.Done():
			return fmt.Errorf("kubecluster: waiting for %s: %w (last: %s); the end of its log:\n%s", what, ctx.Err(), last, p.LogTail(20))
		case <-tick.C:
		}
	}
}

// containerdConfig is a node's containerd configuration: its own root,
// state, socket and runc root; the CRI plugin with the test pause image,
// the node's CNI configuration and Debian's plugins, and
// restrict_oom_score_adj (this machine's sandbox lacks CAP_SYS_RESOURCE,
// so runc may not lower a sandbox's oom_score_adj below containerd's own).
func containerdConfig(n *Node) string {
	q := strconv.Quote
	d := func(p string) string { return q(filepath.Join(n.Dir, p)) }
	return `version = 2
root = ` + d("containerd/root") + `
state = ` + d("containerd/state") + `
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = ` + q(n.Containerd) + `

[plugins."io.containerd.internal.v1.opt"]
  path = ` + d("opt") + `

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = ` + q(PauseImage) + `
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = ` + d("runc") + `
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ` + q(NodeCNIBinDir) + `
    conf_dir = ` + q(NodeCNIConfDir) + `
`
}

// cniConfig is a node's CNI network, a configuration list as network
// plugins write them (so that mantlet's plugin can be chained to it): ptp
// (a veth per pod, the node end holding the gateway address, a /32 route
// to the pod) or bridge, with host-local addresses from the node's pod
// CIDR of the testbed (pods from .11, as the testbed numbers them), no
// masquerading (pods are seen by their own addresses across nodes).
func cniConfig(n *Node, plugin string) []byte {
	cidr := n.Testbed.PodCIDR
	base := cidr.Addr().As4()
	at := func(last byte) string { a := base; a[3] = last; return netip.AddrFrom4(a).String() }
	ipam := map[string]any{
		"type":    "host-local",
		"dataDir": filepath.Join(n.Dir, "ipam"),
		"ranges": [][]map[string]string{{{
			"subnet": cidr.String(), "rangeStart": at(11), "rangeEnd": at(250), "gateway": at(1),
		}}},
		"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
	}
	conf := map[string]any{"type": plugin, "ipMasq": false, "mtu": 1500, "ipam": ipam}
	if plugin == CNIBridge {
		conf["bridge"] = "cni0"
		conf["isGateway"] = true
		conf["hairpinMode"] = true
	}
	list := map[string]any{"cniVersion": "0.4.0", "name": "kubecluster", "plugins": []any{conf}}
	b, _ := json.MarshalIndent(list, "", "  ")
	return b
}

// kubeletConfig is a node's kubelet configuration.
func kubeletConfig(n *Node, caFile string) string {
	q := strconv.Quote
	return `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1; from Kubernetes 1.35 on the kubelet refuses
# it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: ` + q(n.CgroupRoot) + `
containerRuntimeEndpoint: ` + q("unix://"+n.Containerd) + `
podLogsDir: ` + q(filepath.Join(n.Dir, "pod-logs")) + `
volumePluginDir: ` + q(filepath.Join(n.Dir, "kubelet", "volume-plugins")) + `
address: ` + q(n.Testbed.IP.String()) + `
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ` + q(caFile) + `}
authorization: {mode: AlwaysAllow}
failSwapOn: false
# The images are imported, never pulled: image garbage collection would
# delete what cannot come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# The kubelet cannot see this machine's disk (no device information):
# no eviction on disk pressure, nor on memory.
evictionHard: {"memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%"}
localStorageCapacityIsolation: false
protectKernelDefaults: false
maxPods: 110
`
}

// kubeProxyConfig is a node's kube-proxy configuration in mode
// (ProxyIPTables or ProxyNFTables; nftables mode runs the nft program),
// in the node's network namespace; it touches no conntrack sysctl (those
// of the machine are not a node's to change).
func kubeProxyConfig(n *Node, mode string) string {
	q := strconv.Quote
	return `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ` + mode + `
hostnameOverride: ` + q(n.Name) + `
clusterCIDR: ` + q(ClusterCIDR.String()) + `
clientConnection:
  kubeconfig: ` + q(filepath.Join(n.Dir, "kubeconfig")) + `
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
`
}
