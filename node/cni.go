package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/cni"
	"github.com/mantlet/mantlet/internal/workload"
)

// CNIConfig serves mantlet's CNI plugin (cmd/mantlet-cni) and installs it
// into the node's CNI configuration (Kubernetes mode).
type CNIConfig struct {
	// Socket is where the plugin reaches the node (default
	// cni.DefaultSocket).
	Socket string
	// BinDir and ConfDir are the node's CNI bin and configuration
	// folders; empty ConfDir installs nothing (the plugin is configured
	// by hand).
	BinDir, ConfDir string
	// Binary is the plugin binary copied into BinDir.
	Binary string
	// Plugin is the plugin's entry in the network's configuration list.
	Plugin cni.PluginConfig
	// Recheck is how often the configuration is checked and mantlet put
	// back last in it if the network plugin rewrote it (default 5s).
	Recheck time.Duration
	// Uninstall, if set, is asked when the node stops: true removes the
	// plugin from the configuration (the agent is being uninstalled, not
	// restarted), so that pods start without it. While the plugin stays,
	// meshed pods wait for the next agent: they never start uncaptured.
	Uninstall func(ctx context.Context) (bool, string)
}

// addTimeout bounds the agent's wait for a pod: a little less than the
// plugin waits, so that the plugin gets the agent's reason.
func (c *CNIConfig) addTimeout() time.Duration {
	t := time.Duration(c.Plugin.TimeoutSeconds) * time.Second
	if t <= 0 {
		t = cni.DefaultTimeout * time.Second
	}
	return max(t*5/6, t-5*time.Second)
}

// podAnnouncer is a source that takes pods' addresses from the CNI plugin
// before their status has them (source/kubernetes does).
type podAnnouncer interface {
	Announce(ns, name, uid string, ips []netip.Addr) error
	Withdraw(ns, name, uid string)
}

// cniEnroller answers the plugin: it announces the pod's addresses to the
// source and waits until the agent has enrolled the pod's veth, or the
// state says the pod is not meshed.
type cniEnroller struct {
	src     podAnnouncer
	store   *workload.Store
	pods    func() []agent.PodStatus
	recheck func() // asks the agent for a pass now
	poll    time.Duration
	ifindex func(name string) (int, error)
	refused refusals
}

// refusals remembers the pods the agent refused while their sandbox was
// being made, so that the refusal stays visible (the pod's Meshed
// condition, 'mantlet status') after the runtime tore the failed sandbox
// down and the agent forgot the pod. Bounded: the oldest go first, and
// every entry expires.
type refusals struct {
	mu   sync.Mutex
	pods map[string]refusal // by namespace/name
}

type refusal struct {
	st agent.PodStatus
	at time.Time
}

const (
	maxRefusals = 256
	refusalTTL  = 10 * time.Minute
)

func (r *refusals) add(st agent.PodStatus, uid string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pods == nil {
		r.pods = map[string]refusal{}
	}
	if _, ok := r.pods[st.Pod]; !ok && len(r.pods) >= maxRefusals {
		oldest := ""
		for k, v := range r.pods {
			if oldest == "" || v.at.Before(r.pods[oldest].at) {
				oldest = k
			}
		}
		delete(r.pods, oldest)
	}
	st.UID = uid
	r.pods[st.Pod] = refusal{st: st, at: now}
}

func (r *refusals) forget(pod string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.pods, pod)
}

// merge returns pods with the remembered refusals of the pods it does not
// list, sorted by name.
func (r *refusals) merge(pods []agent.PodStatus, now time.Time) []agent.PodStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.pods) == 0 {
		return pods
	}
	out := slices.Clone(pods)
	for k, v := range r.pods {
		if now.Sub(v.at) > refusalTTL {
			delete(r.pods, k)
			continue
		}
		if !slices.ContainsFunc(pods, func(p agent.PodStatus) bool { return p.Pod == k }) {
			out = append(out, v.st)
		}
	}
	slices.SortFunc(out, func(a, b agent.PodStatus) int { return strings.Compare(a.Pod, b.Pod) })
	return out
}

// Pods is the agent's view of its pods plus the pods it refused lately
// whose sandbox is gone (see refusals).
func (e *cniEnroller) Pods() []agent.PodStatus { return e.refused.merge(e.pods(), time.Now()) }

func newCNIEnroller(src podAnnouncer, store *workload.Store, ag *agent.Agent) *cniEnroller {
	return &cniEnroller{src: src, store: store, pods: ag.Pods, recheck: ag.Recheck, poll: 10 * time.Millisecond,
		ifindex: func(name string) (int, error) {
			i, err := net.InterfaceByName(name)
			if err != nil {
				return 0, err
			}
			return i.Index, nil
		}}
}

func (e *cniEnroller) Add(ctx context.Context, r *cni.Request) (cni.Response, error) {
	var ip netip.Addr
	for _, a := range r.IPs {
		if a.Unmap().Is4() {
			ip = a.Unmap()
			break
		}
	}
	if !ip.IsValid() {
		return cni.Response{}, fmt.Errorf("pod %s has no IPv4 address (%v): IPv6 capture is not supported yet", r.Pod(), r.IPs)
	}
	if err := e.src.Announce(r.Namespace, r.Name, r.UID, r.IPs); err != nil {
		return cni.Response{}, err
	}
	host := 0
	if r.HostInterface != "" {
		i, err := e.ifindex(r.HostInterface)
		if err != nil {
			return cni.Response{}, fmt.Errorf("pod %s: host interface %s: %w", r.Pod(), r.HostInterface, err)
		}
		host = i
	}
	// The pod's addresses may be unchanged (a new sandbox with the same
	// address): no new state then, so ask for a pass that finds the new
	// veth.
	e.recheck()
	tick := time.NewTicker(e.poll)
	defer tick.Stop()
	start := time.Now()
	for {
		why := ""
		w := e.store.Load().WorkloadByIP(ip)
		switch {
		case w == nil || w.Namespace != r.Namespace || w.Name != r.Name:
			why = "the agent's informer has not shown the pod yet"
		case !w.Enrolled:
			e.refused.forget(r.Pod())
			return cni.Response{}, nil
		default:
			why = "the agent has not enrolled it yet"
			for _, p := range e.pods() {
				if p.Pod != r.Pod() || p.IP != ip {
					continue
				}
				switch {
				case p.Reason != "":
					// The agent refuses the pod (a bridged CNI): fail the
					// sandbox now with the reason, rather than after the
					// timeout. The pod stays held: it never starts
					// uncaptured.
					e.refused.add(p, r.UID, time.Now())
					return cni.Response{}, fmt.Errorf("pod %s (%s) refused by the agent (%s): %s", r.Pod(), ip, p.Reason, p.Err)
				case p.Err != "":
					why = p.Err
				case p.Ifindex != 0 && (host == 0 || p.Ifindex == host):
					e.refused.forget(r.Pod())
					return cni.Response{Meshed: true, Ifindex: p.Ifindex}, nil
				case p.Ifindex != 0:
					why = fmt.Sprintf("the agent has enrolled veth %d, not the pod's new %s (%d) yet", p.Ifindex, r.HostInterface, host)
					e.recheck()
				}
			}
		}
		select {
		case <-ctx.Done():
			return cni.Response{}, fmt.Errorf("pod %s (%s) not enrolled within %s: %s", r.Pod(), ip, time.Since(start).Round(time.Millisecond), why)
		case <-tick.C:
		}
	}
}

func (e *cniEnroller) Del(_ context.Context, r *cni.Request) error {
	e.src.Withdraw(r.Namespace, r.Name, r.UID)
	return nil
}

// cniInstall is whether the plugin is chained in the node's network, as
// the last check of runCNIInstall found: until it is, the agent is not
// ready, since a new meshed pod could start before it is enrolled.
type cniInstall struct {
	mu     sync.Mutex
	done   bool
	reason string
}

func (c *cniInstall) set(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.done, c.reason = err == nil, ""
	if err != nil {
		c.reason = err.Error()
	}
}

// ready is a readiness check (agent.Config.Ready); nil c is ready.
func (c *cniInstall) ready() (bool, string) {
	if c == nil {
		return true, ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.done:
		return true, ""
	case c.reason == "":
		return false, "the CNI plugin is not chained in the node's network yet"
	}
	return false, "the CNI plugin is not chained in the node's network: " + c.reason
}

// runCNIInstall copies the plugin into the CNI bin folder and keeps it
// last in the node's network configuration until ctx ends, telling inst
// (if not nil) how each check went; then, if cfg.Uninstall says the agent
// is being removed, it takes the plugin out.
func runCNIInstall(ctx context.Context, cfg CNIConfig, inst *cniInstall, log *slog.Logger) error {
	if err := cni.InstallBinary(cfg.Binary, cfg.BinDir); err != nil {
		if inst != nil {
			inst.set(err)
		}
		return err
	}
	every := cfg.Recheck
	if every <= 0 {
		every = 5 * time.Second
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	last := ""
	for {
		path, changed, err := cni.Install(cfg.ConfDir, cfg.Plugin)
		if inst != nil {
			inst.set(err)
		}
		switch {
		case err != nil && err.Error() != last && errors.Is(err, cni.ErrNoNetwork):
			log.Warn("cni: no network configuration to chain to yet; pods wait for it anyway", "conf_dir", cfg.ConfDir)
		case err != nil && err.Error() != last:
			log.Error("cni: plugin not installed; new meshed pods may start before they are enrolled", "error", err)
		case changed:
			log.Info("cni: plugin chained last in the node's network", "file", path, "socket", cfg.Plugin.Socket, "exclude_namespaces", cfg.Plugin.ExcludeNamespaces)
		}
		last = ""
		if err != nil {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			if cfg.Uninstall == nil {
				return nil
			}
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			remove, why := cfg.Uninstall(uctx)
			cancel()
			if !remove {
				log.Info("cni: plugin left in place: meshed pods created before the next agent runs wait for it", "reason", why)
				return nil
			}
			files, err := cni.Uninstall(cfg.ConfDir, cfg.BinDir)
			if err != nil {
				log.Error("cni: removing the plugin failed; pods of meshed namespaces will not start until it is removed from the network configuration", "error", err, "files", files)
				return nil
			}
			log.Info("cni: plugin removed from the node's network", "reason", why, "files", files)
			return nil
		case <-tick.C:
		}
	}
}
