package kubecluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
)

// PodNetns returns the path of a running pod's network namespace
// (/proc/<pid>/ns/net of one of its processes), found through the pod's
// cgroup on its node, since the pod's namespace is bound only in the
// node's mount namespace.
func (c *Cluster) PodNetns(pod *corev1.Pod) (string, error) {
	n := c.Node(pod.Spec.NodeName)
	if n == nil {
		return "", fmt.Errorf("kubecluster: pod %s/%s is on node %q, not one of the cluster's", pod.Namespace, pod.Name, pod.Spec.NodeName)
	}
	base := filepath.Join(cgroupFS, "pids", n.CgroupRoot, "kubepods")
	uid := "pod" + string(pod.UID)
	for _, pattern := range []string{filepath.Join(base, uid, "*", "cgroup.procs"), filepath.Join(base, "*", uid, "*", "cgroup.procs")} {
		files, _ := filepath.Glob(pattern)
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			for field := range strings.FieldsSeq(string(b)) {
				if pid, err := strconv.Atoi(field); err == nil {
					return fmt.Sprintf("/proc/%d/ns/net", pid), nil
				}
			}
		}
	}
	return "", fmt.Errorf("kubecluster: no process of pod %s/%s (uid %s) under %s", pod.Namespace, pod.Name, pod.UID, base)
}

// InNetns runs fn on a locked OS thread inside the network namespace at
// path and returns the thread to where it was; sockets made inside stay
// there. fn must not call t.Fatal.
func InNetns(path string, fn func() error) error {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("kubecluster: open namespace %s: %w", path, err)
	}
	defer h.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("kubecluster: current namespace: %w", err)
			return // the thread dies with the goroutine
		}
		defer orig.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("kubecluster: enter namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("kubecluster: return to namespace: %w", err))
			return // the thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DialFromPod connects to address from inside the pod's network
// namespace: from the pod's address, through its veth, as the pod's own
// programs would.
func (c *Cluster) DialFromPod(ctx context.Context, pod *corev1.Pod, address string) (net.Conn, error) {
	path, err := c.PodNetns(pod)
	if err != nil {
		return nil, err
	}
	var conn net.Conn
	err = InNetns(path, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp", address)
		return err
	})
	return conn, err
}

// Command returns a command that runs name in the control plane's
// namespace, with KUBECONFIG set to the admin's: for kubectl and helm,
// which reach the API server only from inside the testbed.
func (c *Cluster) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + c.Testbed.ControlPlane().NS, "--", name}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.Kubeconfig)
	return cmd
}

// Kubectl runs kubectl (built with the cluster's programs) with args and
// returns its output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	out, err := c.Command(ctx, c.bins.Kubectl, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubecluster: kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
