package kubecluster

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mantlet/mantlet/identity/ca"
)

// The release the README installs.
const (
	MeshNamespace = "mantlet-system"
	MeshRelease   = "mantlet"
	// AgentDaemonSet is the chart's DaemonSet (release name + "-agent").
	AgentDaemonSet = "mantlet-agent"
	// ChartDir is the chart, relative to the repository's root.
	ChartDir = "deploy/charts/mantlet"
)

// BuildArtifacts builds what installing mantlet needs besides the
// Kubernetes programs, into dir: the mantlet image for this machine's
// platform (as 'make image' does, mantlet-image.tar) and helm v4 (from the
// module deploy/tools pins, like the chart's tests). It returns their
// paths. With warm Go caches it takes seconds.
func BuildArtifacts(ctx context.Context, repo, dir string) (image, helm string, err error) {
	image, helm = filepath.Join(dir, "mantlet-image.tar"), filepath.Join(dir, "helm")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", fmt.Errorf("kubecluster: %w", err)
	}
	errc := make(chan error, 1)
	go func() { errc <- buildMantletImage(ctx, repo, image) }()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", helm, "helm.sh/helm/v4/cmd/helm")
	cmd.Dir = filepath.Join(repo, "deploy", "tools")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, herr := cmd.CombinedOutput()
	if herr != nil {
		herr = fmt.Errorf("kubecluster: build helm: %w: %s", herr, strings.TrimSpace(string(out)))
	}
	if err := <-errc; err != nil {
		return "", "", err
	}
	if herr != nil {
		return "", "", herr
	}
	return image, helm, nil
}

// MeshOptions say how to install mantlet.
type MeshOptions struct {
	// Helm is the helm program (from BuildArtifacts).
	Helm string
	// Repo is the repository's root, for the chart.
	Repo string
	// Values are more --set values.
	Values []string
}

// InstallMantlet installs mantlet as the README says: the namespace
// labelled for Pod Security, a CA made by 'mantlet ca init' as a Secret,
// then 'helm install' of the chart, with imagePullPolicy Never (the image
// is imported on every node). It waits until the agent is Ready on every
// node.
func (c *Cluster) InstallMantlet(ctx context.Context, opts MeshOptions) error {
	start := time.Now()
	if _, err := c.Kubectl(ctx, "create", "namespace", MeshNamespace); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "label", "namespace", MeshNamespace, "pod-security.kubernetes.io/enforce=privileged"); err != nil {
		return err
	}
	caDir := filepath.Join(c.Dir, "mantlet-ca")
	if _, err := ca.Init(caDir, spiffeid.RequireTrustDomainFromString("cluster.local"), ca.Options{}); err != nil {
		return fmt.Errorf("kubecluster: mantlet ca init: %w", err)
	}
	if _, err := c.Kubectl(ctx, "-n", MeshNamespace, "create", "secret", "generic", "mantlet-ca", "--from-file="+caDir); err != nil {
		return err
	}
	args := []string{"install", MeshRelease, filepath.Join(opts.Repo, ChartDir), "-n", MeshNamespace, "--set", "image.pullPolicy=Never"}
	if c.ProxyMode == ProxyNone {
		// Nothing translates the kubernetes Service's ClusterIP: the
		// agents (host network) are given the API server's own address,
		// as the chart's kubernetesAPI values say.
		u, err := url.Parse(c.API.AdminConfig().Host)
		if err != nil {
			return fmt.Errorf("kubecluster: the API server's address: %w", err)
		}
		args = append(args, "--set", "kubernetesAPI.host="+u.Hostname(), "--set", "kubernetesAPI.port="+u.Port())
	}
	for _, v := range opts.Values {
		args = append(args, "--set", v)
	}
	cmd := c.Command(ctx, opts.Helm, args...)
	cmd.Env = append(cmd.Env, "HELM_CACHE_HOME="+filepath.Join(c.Dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(c.Dir, "helm", "config"), "HELM_DATA_HOME="+filepath.Join(c.Dir, "helm", "data"))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kubecluster: helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	if err := c.WaitAgentsReady(ctx); err != nil {
		return err
	}
	c.log.Info("mantlet installed, agents Ready", "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// WaitAgentsReady waits until the agent DaemonSet's current pods are
// Ready on every node (its rollout is done).
func (c *Cluster) WaitAgentsReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
	defer cancel()
	admin := c.Admin()
	return c.poll(ctx, "the mantlet agents Ready on every node", func() (bool, string) {
		ds, err := admin.AppsV1().DaemonSets(MeshNamespace).Get(ctx, AgentDaemonSet, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return daemonSetDone(ds, len(c.Nodes))
	})
}

// daemonSetDone reports whether ds's rollout finished on want nodes.
func daemonSetDone(ds *appsv1.DaemonSet, want int) (bool, string) {
	s := ds.Status
	if s.ObservedGeneration < ds.Generation {
		return false, "the controller has not seen the latest spec"
	}
	if int(s.DesiredNumberScheduled) != want || s.UpdatedNumberScheduled != s.DesiredNumberScheduled || s.NumberReady != s.DesiredNumberScheduled || s.NumberAvailable != s.DesiredNumberScheduled {
		return false, fmt.Sprintf("desired %d, updated %d, ready %d, available %d", s.DesiredNumberScheduled, s.UpdatedNumberScheduled, s.NumberReady, s.NumberAvailable)
	}
	return true, ""
}
