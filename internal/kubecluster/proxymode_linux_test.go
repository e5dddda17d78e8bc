package kubecluster

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/mantlet/mantlet/internal/testbed"
)

// TestMeshedClusterIPThroughNFTablesKubeProxy: on a cluster of its own
// whose kube-proxy runs in nftables mode (the Service in kube-proxy's nft
// table, none of its rules in iptables), a meshed client pod on node 1
// reaches the echo pod on node 2 by the Service's ClusterIP: the echo sees
// the client's pod IP, and on the underlay only HBONE crosses between the
// two pods, the marker never in clear.
func TestMeshedClusterIPThroughNFTablesKubeProxy(t *testing.T) {
	meshedClusterIPOn(t, ProxyNFTables, func(ctx context.Context, t *testing.T, c *Cluster, vip string) {
		n1 := c.Nodes[0]
		waitNFTablesServiceProgrammed(ctx, t, n1, vip)
		out, err := n1.Testbed.Command(ctx, "iptables-save", "-t", "nat").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save on %s: %v: %s", n1.Name, err, out)
		}
		if strings.Contains(string(out), vip) {
			t.Errorf("the Service's ClusterIP %s is in %s's iptables nat table: kube-proxy is not (only) in nftables mode:\n%s", vip, n1.Name, out)
		}
	})
}

// TestMeshedClusterIPWithoutKubeProxy: on a cluster of its own with no
// kube-proxy at all (nothing on the nodes translates a ClusterIP), the
// agents reach the API server at the address the chart's kubernetesAPI
// values give, and a meshed client pod on node 1 reaches the echo pod on
// node 2 by the Service's ClusterIP through mantlet alone: the ztunnel
// resolves the Service to its endpoint; the echo sees the client's pod IP,
// only HBONE crosses the underlay, the marker never in clear.
func TestMeshedClusterIPWithoutKubeProxy(t *testing.T) {
	meshedClusterIPOn(t, ProxyNone, func(ctx context.Context, t *testing.T, c *Cluster, vip string) {
		for _, n := range c.Nodes {
			out, err := n.Testbed.Command(ctx, "iptables-save", "-t", "nat").CombinedOutput()
			if err != nil {
				t.Fatalf("iptables-save on %s: %v: %s", n.Name, err, out)
			}
			if strings.Contains(string(out), vip) || strings.Contains(string(out), "KUBE-SERVICES") {
				t.Errorf("%s translates Services (a kube-proxy runs?):\n%s", n.Name, out)
			}
		}
		// An unmeshed pod has nobody to translate the ClusterIP: what the
		// meshed client gets below is mantlet's doing.
		const plain = "proxyplain"
		if _, err := c.Admin().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: plain}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		createPod(ctx, t, c, idlePod(plain, "client", c.Nodes[0].Name))
		p := waitPod(ctx, t, c, plain, "client", "Running", func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != ""
		})
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if conn, err := c.DialFromPod(dctx, p, net.JoinHostPort(vip, "80")); err == nil {
			conn.Close()
			t.Errorf("an unmeshed pod connected to the ClusterIP %s with no kube-proxy on the cluster", vip)
		}
	})
}

// meshedClusterIPOn brings up a cluster of its own whose kube-proxy runs
// in mode, installs mantlet, meshes a namespace with an echo pod on node 2
// and a client on node 1 behind a Service, runs check with the Service's
// ClusterIP, then asserts the client reaches the echo by that ClusterIP,
// meshed.
func meshedClusterIPOn(t *testing.T, mode string, check func(ctx context.Context, t *testing.T, c *Cluster, vip string)) {
	t.Helper()
	ctx, c := ownClusterWithMantlet(t, "cluster with kube-proxy mode "+mode, Options{ProxyMode: mode})

	const ns = "proxyshop"
	n1, n2 := c.Nodes[0], c.Nodes[1]
	admin := c.Admin()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns,
		Annotations: map[string]string{"mantlet.io/mesh": "enabled"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createPod(ctx, t, c, echoPod(ns, "echo", n2.Name))
	createPod(ctx, t, c, idlePod(ns, "client", n1.Name))
	svc, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(echoPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	echo := waitPod(ctx, t, c, ns, "echo", "Running and Meshed", func(p *corev1.Pod) bool {
		return p.Status.PodIP != "" && podReady(p) && meshedCondition(p)
	})
	client := waitPod(ctx, t, c, ns, "client", "Running and Meshed", func(p *corev1.Pod) bool {
		return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && meshedCondition(p)
	})
	check(ctx, t, c, svc.Spec.ClusterIP)

	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	echoIP := netip.MustParseAddr(echo.Status.PodIP)
	if err := c.WaitAgentMeshes(ctx, n1, client.Status.PodIP, vip, echoIP); err != nil {
		t.Fatal(err)
	}
	defer logFlowsOnFailure(t, c, n1, client.Status.PodIP)
	marker := newMarker(t)
	stop := capture(t, c)
	greeting, err := talk(ctx, c, client, vip, marker)
	if err != nil {
		t.Fatalf("meshed, to the ClusterIP %s: %v", vip, err)
	}
	pkts := stop()
	if want := "hello from echo to " + client.Status.PodIP + ":"; !strings.HasPrefix(greeting, want) {
		t.Errorf("greeting %q, want %q... (the echo sees the client's pod IP)", greeting, want)
	}
	if testbed.Contains(pkts, []byte(marker)) {
		t.Error("the marker crossed the underlay in clear")
	}
	checkOnlyHBONE(t, pkts, HBONEConns{}, netip.MustParseAddr(client.Status.PodIP), echoIP, vip)
}

// waitNFTablesServiceProgrammed waits until kube-proxy (nftables mode) on
// node maps vip, port 80, to its Service in the kube-proxy table.
func waitNFTablesServiceProgrammed(ctx context.Context, t *testing.T, node *Node, vip string) {
	t.Helper()
	var last string
	for ctx.Err() == nil {
		out, err := node.Testbed.Command(ctx, "nft", "list", "map", "ip", "kube-proxy", "service-ips").CombinedOutput()
		last = string(out)
		if err == nil && strings.Contains(last, vip+" . tcp . 80 : goto service-") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("kube-proxy (nftables) on %s never programmed %s: %v; its service-ips map:\n%s", node.Name, vip, ctx.Err(), last)
}
