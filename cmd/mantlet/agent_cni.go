package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8s "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/mantlet/mantlet/cni"
	"github.com/mantlet/mantlet/node"
)

// cniFlags are the flags of mantlet's CNI plugin (cmd/mantlet-cni):
// Kubernetes mode only.
type cniFlags struct {
	on        bool
	socket    string
	binDir    string
	confDir   string
	plugin    string
	exclude   excludeFlag
	timeout   time.Duration
	daemonSet string
}

func addCNIFlags(fs *flag.FlagSet, c *cniFlags) {
	fs.BoolVar(&c.on, "cni", false, "Kubernetes mode: answer mantlet's CNI plugin on --cni-socket, so that a new pod of a meshed namespace is enrolled before its containers start (and never starts while no agent answers), and install the plugin with --cni-conf-dir")
	fs.StringVar(&c.socket, "cni-socket", cni.DefaultSocket, "unix socket where the CNI plugin reaches the agent (a host path)")
	fs.StringVar(&c.binDir, "cni-bin-dir", "", "the node's CNI bin folder, where the plugin binary is copied (with --cni-conf-dir)")
	fs.StringVar(&c.confDir, "cni-conf-dir", "", "the node's CNI configuration folder: the plugin is chained last in its network (the first file, as the runtime reads them) and kept there; empty: configure the plugin by hand")
	fs.StringVar(&c.plugin, "cni-plugin-binary", "", "the plugin binary to install (default: mantlet-cni beside this program)")
	fs.Var(&c.exclude, "cni-exclude-namespace", "namespace whose pods start without the agent (repeat or comma-separate; default "+strings.Join(cni.DefaultExcludedNamespaces, ",")+")")
	fs.DurationVar(&c.timeout, "cni-timeout", cni.DefaultTimeout*time.Second, "how long the plugin waits for the agent's answer before it fails the pod's sandbox (the runtime then tries again)")
	fs.StringVar(&c.daemonSet, "cni-daemonset", "", "`namespace/name` of this agent's DaemonSet: when the agent stops and the DaemonSet is gone or being deleted (mantlet is uninstalled), the plugin is taken out of the network; otherwise (a restart, an upgrade) it stays, so that meshed pods wait for the next agent")
}

// check validates the CNI flags; the message names the flag.
func (c *cniFlags) check(kubernetes bool) error {
	switch {
	case !c.on:
		return nil
	case !kubernetes:
		return fmt.Errorf("--cni needs --kubernetes or --kubeconfig (the plugin's pods are read from the API server)")
	case (c.binDir == "") != (c.confDir == ""):
		return fmt.Errorf("--cni-bin-dir and --cni-conf-dir go together")
	case c.timeout < time.Second:
		return fmt.Errorf("--cni-timeout %v: want at least 1s", c.timeout)
	}
	if c.daemonSet != "" {
		if ns, name, ok := strings.Cut(c.daemonSet, "/"); !ok || ns == "" || name == "" {
			return fmt.Errorf("--cni-daemonset %q: want namespace/name", c.daemonSet)
		}
	}
	return nil
}

// config turns the flags into the node's CNI configuration (nil when
// off).
func (c *cniFlags) config(rc *rest.Config) (*node.CNIConfig, error) {
	if !c.on {
		return nil, nil
	}
	exclude := []string(c.exclude.list)
	if !c.exclude.set {
		exclude = cni.DefaultExcludedNamespaces
	}
	cfg := &node.CNIConfig{Socket: c.socket, BinDir: c.binDir, ConfDir: c.confDir, Binary: c.plugin,
		Plugin: cni.PluginConfig{Socket: c.socket, ExcludeNamespaces: exclude, TimeoutSeconds: int(c.timeout / time.Second)}}
	if cfg.ConfDir != "" && cfg.Binary == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("--cni-plugin-binary: %w", err)
		}
		cfg.Binary = filepath.Join(filepath.Dir(self), cni.PluginType)
	}
	if cfg.ConfDir != "" {
		if _, err := os.Stat(cfg.Binary); err != nil {
			return nil, fmt.Errorf("--cni-plugin-binary: %w", err)
		}
	}
	if c.daemonSet != "" && rc != nil {
		client, err := k8s.NewForConfig(rc)
		if err != nil {
			return nil, fmt.Errorf("--cni-daemonset: %w", err)
		}
		ns, name, _ := strings.Cut(c.daemonSet, "/")
		cfg.Uninstall = func(ctx context.Context) (bool, string) {
			return daemonSetGone(ctx, client, ns, name)
		}
	}
	return cfg, nil
}

// daemonSetGone reports whether the agent's DaemonSet is gone or being
// deleted (mantlet is being uninstalled), and why it thinks so. An API
// server that cannot say keeps the plugin: fail closed.
func daemonSetGone(ctx context.Context, client k8s.Interface, ns, name string) (bool, string) {
	ds, err := client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return true, "DaemonSet " + ns + "/" + name + " is gone"
	case apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err):
		return true, "the agent's access to the API server was removed (" + err.Error() + ")"
	case err != nil:
		return false, "cannot tell whether DaemonSet " + ns + "/" + name + " is being deleted: " + err.Error()
	case ds.DeletionTimestamp != nil:
		return true, "DaemonSet " + ns + "/" + name + " is being deleted"
	}
	return false, "DaemonSet " + ns + "/" + name + " stays (a restart or an upgrade)"
}

// excludeFlag is a list flag that knows whether it was given (an empty
// value then excludes no namespace).
type excludeFlag struct {
	list listFlag
	set  bool
}

func (e *excludeFlag) String() string { return e.list.String() }

func (e *excludeFlag) Set(s string) error {
	e.set = true
	return e.list.Set(s)
}
