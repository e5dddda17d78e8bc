package node

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/cni"
	"github.com/mantlet/mantlet/internal/workload"
)

// fakeCluster plays the source and the agent: an announcement puts the
// pod in the store (meshed as its namespace says); the agent enrolls it
// on ifindex after a few passes.
type fakeCluster struct {
	mu        sync.Mutex
	store     *workload.Store
	meshed    map[string]bool // namespace → meshed
	enrollOn  int             // the ifindex the agent enrolls; 0: never
	passes    int
	withdrawn []string
}

func (f *fakeCluster) Announce(ns, name, uid string, ips []netip.Addr) error {
	snap, err := workload.New(nil, []workload.Workload{{UID: uid, Namespace: ns, Name: name, Node: "n1", IPs: ips, Enrolled: f.meshed[ns]}}, nil)
	if err != nil {
		return err
	}
	f.store.Replace(snap)
	return nil
}

func (f *fakeCluster) Withdraw(ns, name, _ string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.withdrawn = append(f.withdrawn, ns+"/"+name)
}

func (f *fakeCluster) recheck() {}

// pods is the agent's status: the pod appears enrolled on the third look.
func (f *fakeCluster) pods() []agent.PodStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.passes++
	if f.passes < 3 || f.enrollOn == 0 {
		return []agent.PodStatus{{Pod: "shop/new", IP: netip.MustParseAddr("198.19.1.11"), Err: "find veth: no route to 198.19.1.11"}}
	}
	return []agent.PodStatus{{Pod: "shop/new", IP: netip.MustParseAddr("198.19.1.11"), Ifindex: f.enrollOn}}
}

func TestTheCNIAnswerWaitsUntilTheAgentEnrolledThePodsVeth(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ns        string
		enrollOn  int
		want      cni.Response
		wantErr   string
		wantLooks int // at least this many looks at the agent
	}{
		{"a meshed pod: once its veth is enrolled", "shop", 42, cni.Response{Meshed: true, Ifindex: 42}, "", 3},
		{"an unmeshed pod: at once", "plain", 0, cni.Response{}, "", 0},
		{"a meshed pod the agent cannot enroll: the agent's reason", "shop", 0, cni.Response{}, "pod shop/new (198.19.1.11) not enrolled within", 3},
		{"the agent enrolled another veth: not this sandbox's", "shop", 41, cni.Response{}, "the agent has enrolled veth 41, not the pod's new veth-new (42) yet", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeCluster{store: workload.NewStore(), meshed: map[string]bool{"shop": true}, enrollOn: tc.enrollOn}
			e := &cniEnroller{src: f, store: f.store, pods: f.pods, recheck: f.recheck, poll: time.Millisecond,
				ifindex: func(string) (int, error) { return 42, nil }}
			ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
			defer cancel()
			ns := tc.ns
			got, err := e.Add(ctx, &cni.Request{Command: cni.Add, Namespace: ns, Name: "new", UID: "u1",
				IPs: []netip.Addr{netip.MustParseAddr("198.19.1.11")}, HostInterface: "veth-new"})
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want one with %q", err, tc.wantErr)
			case got != tc.want:
				t.Errorf("answer %+v, want %+v", got, tc.want)
			}
			if f.passes < tc.wantLooks {
				t.Errorf("answered after %d looks at the agent, want at least %d", f.passes, tc.wantLooks)
			}
		})
	}
}

func TestTheCNIAnswerRefusesPodsWithoutIPv4(t *testing.T) {
	f := &fakeCluster{store: workload.NewStore(), meshed: map[string]bool{}}
	e := &cniEnroller{src: f, store: f.store, pods: f.pods, recheck: f.recheck, poll: time.Millisecond}
	_, err := e.Add(t.Context(), &cni.Request{Namespace: "shop", Name: "v6", IPs: []netip.Addr{netip.MustParseAddr("fd00::1")}})
	if err == nil || err.Error() != "pod shop/v6 has no IPv4 address ([fd00::1]): IPv6 capture is not supported yet" {
		t.Errorf("error %v", err)
	}
	if err := e.Del(t.Context(), &cni.Request{Namespace: "shop", Name: "v6"}); err != nil || len(f.withdrawn) != 1 {
		t.Errorf("Del: %v, withdrawn %v", err, f.withdrawn)
	}
}

func TestTheAgentGivesUpBeforeThePlugin(t *testing.T) {
	for _, tc := range []struct {
		seconds int
		want    time.Duration
	}{{0, 25 * time.Second}, {30, 25 * time.Second}, {10, 8333333333}, {120, 115 * time.Second}} {
		c := &CNIConfig{Plugin: cni.PluginConfig{TimeoutSeconds: tc.seconds}}
		if got := c.addTimeout(); got != tc.want {
			t.Errorf("plugin timeout %ds: the agent waits %v, want %v", tc.seconds, got, tc.want)
		}
	}
}

func TestTheCNIAnswerFailsAtOnceForAPodTheAgentRefuses(t *testing.T) {
	f := &fakeCluster{store: workload.NewStore(), meshed: map[string]bool{"shop": true}}
	gone := false // the runtime tore the sandbox down: the agent forgot the pod
	refused := func() []agent.PodStatus {
		if gone {
			return nil
		}
		return []agent.PodStatus{{Pod: "shop/new", IP: netip.MustParseAddr("198.19.1.11"), Reason: agent.ReasonBridgedCNI,
			Err: "find veth: route to 198.19.1.11 leaves through cni0, a bridge: " + agent.ErrBridgedCNI.Error()}}
	}
	e := &cniEnroller{src: f, store: f.store, pods: refused, recheck: f.recheck, poll: time.Millisecond,
		ifindex: func(string) (int, error) { return 42, nil }}
	// A long deadline: the answer must not wait for it.
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	start := time.Now()
	got, err := e.Add(ctx, &cni.Request{Command: cni.Add, Namespace: "shop", Name: "new", UID: "u1",
		IPs: []netip.Addr{netip.MustParseAddr("198.19.1.11")}, HostInterface: "veth-new"})
	want := "pod shop/new (198.19.1.11) refused by the agent (BridgedCNINotSupported): find veth: route to 198.19.1.11 leaves through cni0, a bridge: " + agent.ErrBridgedCNI.Error()
	if err == nil || err.Error() != want || got.Meshed {
		t.Fatalf("answer %+v, error %v\nwant error %s", got, err, want)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("answered after %v; a refused pod is answered at once, not at the timeout", took)
	}
	// The refusal stays visible (Meshed condition, 'mantlet status') once
	// the sandbox is gone.
	gone = true
	if ps := e.Pods(); len(ps) != 1 || ps[0].Pod != "shop/new" || ps[0].UID != "u1" || ps[0].Reason != agent.ReasonBridgedCNI {
		t.Errorf("Pods after the sandbox went = %+v; want the refused pod", ps)
	}
}

// The agent is not ready until its plugin is chained in the node's
// network: a ready agent's node holds new meshed pods until they are
// enrolled. Before the network plugin wrote its configuration there is
// nothing to chain to; once it did, the agent chains itself and is ready.
func TestCNIPluginChainedIsPartOfReadiness(t *testing.T) {
	dir := t.TempDir()
	binary := filepath.Join(dir, "mantlet-cni")
	if err := os.WriteFile(binary, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	confDir, binDir := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin")
	for _, d := range []string{confDir, binDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	inst := &cniInstall{}
	if ok, why := inst.ready(); ok || why == "" {
		t.Fatalf("before the first check: ready %v (%q), want not ready with a reason", ok, why)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- runCNIInstall(ctx, CNIConfig{ConfDir: confDir, BinDir: binDir, Binary: binary, Recheck: 10 * time.Millisecond},
			inst, slog.New(slog.DiscardHandler))
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	waitReady := func(want bool) string {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			ok, why := inst.ready()
			if ok == want {
				return why
			}
			if time.Now().After(deadline) {
				t.Fatalf("ready %v (%q), want %v", ok, why, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if why := waitReady(false); !strings.Contains(why, "not chained") {
		t.Fatalf("no network configuration yet: reason %q, want it to say the plugin is not chained", why)
	}
	conf := `{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"ptp"}]}`
	if err := os.WriteFile(filepath.Join(confDir, "10-net.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	waitReady(true)
	b, err := os.ReadFile(filepath.Join(confDir, "10-net.conflist"))
	if err != nil || !strings.Contains(string(b), `"mantlet-cni"`) {
		t.Fatalf("ready, and the network configuration is %s (%v): want mantlet-cni chained", b, err)
	}
}
