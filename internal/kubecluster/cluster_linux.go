package kubecluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/proc"
	"github.com/mantlet/mantlet/internal/testbed"
)

// Options configure Up.
type Options struct {
	// Name is the cluster's name: the testbed's prefix, and the start of
	// every node's name ("<name>-node1"), so that the agents of two
	// clusters never share a pin folder. 1 to 12 lower-case letters and
	// digits; "kc" and six random hex digits when empty.
	Name string
	// Nodes is the number of nodes (default DefaultNodes).
	Nodes int
	// CNI is CNIPtp (default) or CNIBridge.
	CNI string
	// ProxyMode is how kube-proxy runs on the nodes: ProxyIPTables
	// (default), ProxyNFTables, or ProxyNone (no kube-proxy).
	ProxyMode string
	// Repo is the mantlet repository's root (default: found from the
	// working directory); the test images are built from it.
	Repo string
	// Binaries are the Kubernetes programs (default kubebin.Find).
	Binaries *kubebin.Binaries
	// Images are more OCI archives to import into every node's containerd
	// (the mantlet image, say).
	Images []string
	// Log receives what the harness does (default: discard).
	Log *slog.Logger
	// StateDir and RunRoot move the state files and the clusters' files
	// (default DefaultStateDir and DefaultRunRoot).
	StateDir, RunRoot string
}

// Cluster is a running cluster. Close removes it.
type Cluster struct {
	// Name is the cluster's name (the testbed's prefix).
	Name string
	// Testbed holds the namespaces: underlay, control plane, nodes.
	Testbed *testbed.Testbed
	// API is the API server; its Admin client reaches it from the control
	// plane's namespace.
	API *kubetest.Server
	// Nodes in order.
	Nodes []*Node
	// Kubeconfig is the path of an admin kubeconfig file. The server's
	// address is only reachable from the testbed's namespaces: run kubectl
	// and helm through Cluster.Command.
	Kubeconfig string
	// Dir holds the cluster's files.
	Dir string
	// ProxyMode is how kube-proxy runs on the nodes (Options.ProxyMode).
	ProxyMode string

	bins     kubebin.Binaries
	log      *slog.Logger
	stateDir string
	procs    launcher
	control  []*proc.Process // controller manager, scheduler

	closeOnce sync.Once
	closeErr  error
}

// Node is one node of the cluster.
type Node struct {
	// Name is the Kubernetes node's name.
	Name string
	// Testbed is the node's namespace in the testbed (IP, NS, PodCIDR).
	Testbed *testbed.Node
	// Dir holds the node's configuration, state and logs.
	Dir string
	// CgroupRoot is the kubelet's cgroup root (in every v1 hierarchy).
	CgroupRoot string
	// Containerd is the address of the node's containerd socket.
	Containerd string

	containerd, kubelet, proxy *proc.Process
}

// Up builds a cluster and waits until its nodes are Ready. If anything
// fails, what was made is removed and the error says what failed, with the
// end of the failing program's log. ctx bounds the bring-up, not the
// cluster, which runs until Close.
func Up(ctx context.Context, opts Options) (*Cluster, error) {
	start := time.Now()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Nodes <= 0 {
		opts.Nodes = DefaultNodes
	}
	if opts.CNI == "" {
		opts.CNI = CNIPtp
	}
	if opts.CNI != CNIPtp && opts.CNI != CNIBridge {
		return nil, fmt.Errorf("kubecluster: CNI %q: want %s or %s", opts.CNI, CNIPtp, CNIBridge)
	}
	if opts.ProxyMode == "" {
		opts.ProxyMode = ProxyIPTables
	}
	if opts.ProxyMode != ProxyIPTables && opts.ProxyMode != ProxyNFTables && opts.ProxyMode != ProxyNone {
		return nil, fmt.Errorf("kubecluster: proxy mode %q: want %s, %s or %s", opts.ProxyMode, ProxyIPTables, ProxyNFTables, ProxyNone)
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	if opts.RunRoot == "" {
		opts.RunRoot = DefaultRunRoot
	}
	if opts.Name == "" {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("kubecluster: random name: %w", err)
		}
		opts.Name = "kc" + hex.EncodeToString(b[:])
	}
	if err := testbed.ValidatePrefix(opts.Name); err != nil {
		return nil, fmt.Errorf("kubecluster: name: %w", err)
	}
	if opts.Repo == "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, fmt.Errorf("kubecluster: %w", err)
		}
		if opts.Repo, err = kubebin.RepoRoot(wd); err != nil {
			return nil, err
		}
	}
	if opts.Binaries == nil {
		b, err := kubebin.Find()
		if err != nil {
			return nil, err
		}
		opts.Binaries = &b
	}
	if err := checkTools(opts.ProxyMode); err != nil {
		return nil, err
	}
	sweep(opts.StateDir, opts.Log)

	c := &Cluster{
		Name:      opts.Name,
		Dir:       filepath.Join(opts.RunRoot, opts.Name),
		ProxyMode: opts.ProxyMode,
		bins:      *opts.Binaries,
		log:       opts.Log.With("cluster", opts.Name),
		stateDir:  opts.StateDir,
		procs:     launcher{proc.NewLauncher()},
	}
	st := state{Name: c.Name, PID: os.Getpid(), Dir: c.Dir, Created: time.Now().UTC()}
	for i := range opts.Nodes {
		st.CgroupRoots = append(st.CgroupRoots, cgroupRoot(c.Name, nodeName(c.Name, i+1)))
	}
	if err := claimState(opts.StateDir, st); err != nil {
		c.procs.Close()
		return nil, err
	}
	if err := c.up(ctx, opts); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	c.log.Info("cluster up", "nodes", len(c.Nodes), "cni", opts.CNI, "proxy", opts.ProxyMode, "took", time.Since(start).Round(time.Millisecond))
	return c, nil
}

// nodeName names node i (from 1) of a cluster.
func nodeName(cluster string, i int) string { return fmt.Sprintf("%s-node%d", cluster, i) }

// cgroupRoot is a node's kubelet cgroup root.
func cgroupRoot(cluster, node string) string {
	return "/kubecluster/" + strings.TrimPrefix(node, cluster+"-") + "-" + cluster
}

func (c *Cluster) up(ctx context.Context, opts Options) error {
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return fmt.Errorf("kubecluster: %w", err)
	}
	// The test images, while the testbed and the control plane come up.
	images := filepath.Join(c.Dir, "test-images.tar")
	imgErr := make(chan error, 1)
	go func() { imgErr <- buildTestImages(ctx, opts.Repo, images) }()

	spec := testbed.Spec{ControlPlane: true}
	for i := range opts.Nodes {
		spec.Nodes = append(spec.Nodes, testbed.NodeSpec{Name: nodeName(c.Name, i+1)})
	}
	tb, err := testbed.New(ctx, spec, testbed.WithPrefix(c.Name), testbed.WithLogger(c.log))
	if err != nil {
		<-imgErr
		return fmt.Errorf("kubecluster: testbed: %w", err)
	}
	c.Testbed = tb
	if c.API, err = kubetest.Launch(ctx, kubetest.Options{
		ControlPlane: tb.ControlPlane(),
		Binaries:     &c.bins,
		Log:          c.log,
		Cluster:      true,
	}); err != nil {
		<-imgErr
		return err
	}
	kc, err := c.API.AdminKubeconfig()
	if err != nil {
		<-imgErr
		return err
	}
	c.Kubeconfig = filepath.Join(c.Dir, "admin.kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, kc, 0o600); err != nil {
		<-imgErr
		return fmt.Errorf("kubecluster: %w", err)
	}
	if err := c.startControllers(); err != nil {
		<-imgErr
		return err
	}
	if err := <-imgErr; err != nil {
		return err
	}
	archives := append([]string{images}, opts.Images...)
	errs := make([]error, len(tb.Nodes()))
	var wg sync.WaitGroup
	for i, tn := range tb.Nodes() {
		n := &Node{
			Name:       tn.Name,
			Testbed:    tn,
			Dir:        filepath.Join(c.Dir, tn.Name),
			CgroupRoot: cgroupRoot(c.Name, tn.Name),
		}
		n.Containerd = filepath.Join(n.Dir, "containerd.sock")
		c.Nodes = append(c.Nodes, n)
		wg.Go(func() { errs[i] = c.startNode(ctx, n, opts.CNI, opts.ProxyMode, archives) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return c.waitNodesReady(ctx)
}

// startControllers runs kube-controller-manager and kube-scheduler in the
// control plane's namespace.
func (c *Cluster) startControllers() error {
	cp := c.Testbed.ControlPlane()
	kc := "--kubeconfig=" + c.Kubeconfig
	cm, err := c.procs.start(procSpec{
		name: "kube-controller-manager", netns: cp.NS, log: filepath.Join(c.Dir, "kube-controller-manager.log"),
		argv: []string{c.bins.ControllerManager, kc,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--root-ca-file=" + c.API.CAFile(),
			"--service-account-private-key-file=" + c.API.ServiceAccountKeyFile(),
			"--use-service-account-credentials=false",
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
			"--cluster-name=" + c.Name,
			"--cluster-cidr=" + ClusterCIDR.String(),
			"--service-cluster-ip-range=" + testbed.ServiceCIDR.String(),
		},
	})
	if err != nil {
		return err
	}
	c.control = append(c.control, cm)
	sch, err := c.procs.start(procSpec{
		name: "kube-scheduler", netns: cp.NS, log: filepath.Join(c.Dir, "kube-scheduler.log"),
		argv: []string{c.bins.Scheduler, kc,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
		},
	})
	if err != nil {
		return err
	}
	c.control = append(c.control, sch)
	return nil
}

// waitNodesReady waits until every node is Ready, the default
// ServiceAccount exists (pods need it) and the kubernetes Service has its
// endpoints (agents in pods reach the API server through it).
func (c *Cluster) waitNodesReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
	defer cancel()
	admin := c.API.Admin()
	return c.poll(ctx, "nodes Ready, the default ServiceAccount and the API server's endpoints", func() (bool, string) {
		for _, n := range c.Nodes {
			node, err := admin.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, fmt.Sprintf("node %s: %v", n.Name, err)
			}
			if !nodeReady(node) {
				return false, fmt.Sprintf("node %s not Ready: %s", n.Name, nodeReadyMessage(node))
			}
		}
		if _, err := admin.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return false, fmt.Sprintf("default ServiceAccount: %v", err)
		}
		ep, err := admin.DiscoveryV1().EndpointSlices("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err != nil || len(ep.Endpoints) == 0 {
			return false, fmt.Sprintf("kubernetes EndpointSlice: %v", err)
		}
		return true, ""
	})
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func nodeReadyMessage(n *corev1.Node) string {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Reason + ": " + c.Message
		}
	}
	return "no Ready condition yet"
}

// poll calls ready every 200 ms until it reports true; if a process of
// the cluster exits first, or ctx ends, the error says so with the end of
// its log or the last thing ready said.
func (c *Cluster) poll(ctx context.Context, what string, ready func() (bool, string)) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	last := "nothing yet"
	for {
		ok, why := ready()
		if ok {
			return nil
		}
		last = why
		if p := c.exited(); p != nil {
			return fmt.Errorf("kubecluster: waiting for %s: %w", what, p.ExitError())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kubecluster: waiting for %s: %w (last: %s)", what, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// exited returns a process of the cluster that has exited, or nil.
func (c *Cluster) exited() *proc.Process {
	ps := append([]*proc.Process(nil), c.control...)
	for _, n := range c.Nodes {
		ps = append(ps, n.containerd, n.kubelet, n.proxy)
	}
	for _, p := range ps {
		if p != nil && !p.Running() {
			return p
		}
	}
	return nil
}

// Admin returns the admin's clientset.
func (c *Cluster) Admin() *kubernetes.Clientset { return c.API.Admin() }

// Node returns the node named name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Close kills every process of the cluster and removes everything it
// made: cgroups, mounts (with the nodes' mount namespaces), the testbed,
// the files and the state file. It is idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		start := time.Now()
		var errs []error
		// The nodes first: nothing then writes to the API server.
		errs = append(errs, killCgroups(st(c).CgroupRoots, c.log))
		for _, p := range c.control {
			errs = append(errs, wrap(p.Kill()))
		}
		c.procs.Close()
		if c.API != nil {
			errs = append(errs, c.API.Stop())
		}
		errs = append(errs, removeCluster(st(c), c.stateDir, c.log))
		c.closeErr = errors.Join(errs...)
		if c.closeErr == nil {
			c.log.Info("cluster removed", "took", time.Since(start).Round(time.Millisecond))
		}
	})
	return c.closeErr
}

// st is the state of c, as recorded.
func st(c *Cluster) state {
	s := state{Name: c.Name, Dir: c.Dir}
	for i := range max(len(c.Nodes), len(c.stateRoots())) {
		s.CgroupRoots = append(s.CgroupRoots, cgroupRoot(c.Name, nodeName(c.Name, i+1)))
	}
	return s
}

// stateRoots returns the cgroup roots the state file recorded.
func (c *Cluster) stateRoots() []string {
	s, err := readState(c.stateDir, c.Name)
	if err != nil {
		return nil
	}
	return s.CgroupRoots
}
