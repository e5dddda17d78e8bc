package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
	mkube "github.com/mantlet/mantlet/source/kubernetes"
)

// agentScale is a cluster for runAgentScale: one real node (a testbed
// node, its agent the real `mantlet agent` in Kubernetes mode) among
// API-only nodes whose pods, services and policies exist only in the API
// server.
type agentScale struct {
	// fill is the API-only part of the cluster.
	fill kubetest.Fill
	// localPods are the testbed pods of the agent's node, the spare one
	// (created and deleted by the new-pod changes) included; services and
	// policies are the bench namespace's.
	localPods, services, policies int
	// rounds is how many changes are timed in each phase (quiet, churn).
	rounds int
	// churn is how many pod changes a second the churn phase makes to
	// API-only pods, and settle how long the agent idles after it is
	// ready before its memory is taken.
	churn  int
	settle time.Duration
}

// fullScale is issue 10's cluster: 10,000 pods on 20 nodes (100 on the
// agent's node, kubelet's default limit being 110), 1,000 services,
// 1,000 MeshPolicies.
var fullScale = agentScale{
	fill: kubetest.Fill{Prefix: "ns-", Namespaces: 99, PodsPerNamespace: 100, ServicesPerNamespace: 10, Policies: 10,
		Nodes: scaleNodeNames(1, 20)},
	localPods: 100, services: 10, policies: 10, rounds: 120, churn: 50, settle: 10 * time.Second,
}

// smokeScale runs the same code on a small cluster, for make test.
var smokeScale = agentScale{
	fill:      kubetest.Fill{Prefix: "ns-", Namespaces: 3, PodsPerNamespace: 10, ServicesPerNamespace: 2, Policies: 2, Nodes: scaleNodeNames(1, 3)},
	localPods: 5, services: 2, policies: 3, rounds: 6, churn: 10, settle: 0,
}

// scaleNode is the agent's node.
const scaleNode = "node-0"

func scaleNodeNames(from, to int) []string {
	var out []string
	for n := from; n < to; n++ {
		out = append(out, "node-"+strconv.Itoa(n))
	}
	return out
}

// scaleResult is what runAgentScale measured.
type scaleResult struct {
	ready       time.Duration // agent start to ready with its pods enrolled
	synced      procMem       // after the sync, once the agent idled
	churnPeak   procMem       // highest VmRSS sampled during the churn phase (its other fields from the same sample)
	churnEnd    procMem       // at the end of the churn phase
	cpu         float64       // the agent's CPU during the churn phase, % of one core
	churnRate   float64       // pod changes a second the churn phase made
	quiet, busy []timedChange // the changes, timed, without and with churn
}

type timedChange struct {
	kind string
	took time.Duration
}

// BenchmarkAgentScale runs one real agent (`mantlet agent` in Kubernetes
// mode, as the chart runs it: its service account's token, eBPF loaded in
// the testbed node's namespace, the ztunnel, the admin API) on node-0 of a
// cluster held by a real API server: 10,000 pods on 20 nodes (100 of them
// testbed pods on node-0, the rest only in the API server), 1,000
// services with their EndpointSlices, 1,000 MeshPolicies. It reports:
//
//   - ready-s: from the agent's start to ready with its pods enrolled;
//   - rss-MB, pss-anon-MB (10^6 bytes): the agent's resident set (VmRSS) and its
//     proportional anonymous memory (smaps_rollup Pss_Anon) after the
//     sync, once it idled 10 s; hwm-MB its peak resident set until then;
//   - churn-rss-MB, churn-pss-anon-MB: the highest during 50 pod changes a
//     second; cpu-%: its CPU meanwhile (100 = one core);
//   - change-p50-ms, change-p99-ms (quiet) and churn-change-p50-ms,
//     churn-change-p99-ms (during the churn): from an API write to the
//     moment the node's data path has it, over 120 changes each: a pod
//     label that flips a DENY for a pod on node-0, a MeshPolicy's port
//     that flips one (both seen by a real connection from a node-0 pod
//     turning from answered to refused or back), a new pod on node-0 and
//     its deletion (seen as its veth's programs attached or detached, in
//     the admin API's data path status).
//
// It ignores b.N: run it with -benchtime=1x (make bench does). Filling the
// API server takes minutes; the whole run about ten on a loaded 2-core
// machine. MANTLET_SCALE_PROFILES=DIR runs the agent with Go's default
// heap-profile rate and saves its heap and allocation profiles after the
// sync and after the churn.
func BenchmarkAgentScale(b *testing.B) {
	r := runAgentScale(b, fullScale)
	mb := func(v uint64) float64 { return float64(v) / 1e6 } // MB as the goal says: 10^6 bytes
	b.ReportMetric(r.ready.Seconds(), "ready-s")
	b.ReportMetric(mb(r.synced.rss), "rss-MB")
	b.ReportMetric(mb(r.synced.pssAnon), "pss-anon-MB")
	b.ReportMetric(mb(r.synced.hwm), "hwm-MB")
	b.ReportMetric(mb(r.churnPeak.rss), "churn-rss-MB")
	b.ReportMetric(mb(max(r.churnPeak.pssAnon, r.churnEnd.pssAnon)), "churn-pss-anon-MB")
	b.ReportMetric(r.cpu, "cpu-%")
	b.ReportMetric(r.churnRate, "churn-changes/s")
	p50, p99 := percentiles(r.quiet, "")
	b.ReportMetric(ms(p50), "change-p50-ms")
	b.ReportMetric(ms(p99), "change-p99-ms")
	p50, p99 = percentiles(r.busy, "")
	b.ReportMetric(ms(p50), "churn-change-p50-ms")
	b.ReportMetric(ms(p99), "churn-change-p99-ms")
	for _, phase := range []struct {
		name string
		c    []timedChange
	}{{"quiet", r.quiet}, {"churn", r.busy}} {
		for _, kind := range []string{"pod label", "policy port", "new pod", "pod deleted"} {
			p50, p99 := percentiles(phase.c, kind)
			b.Logf("%s, %s: p50 %v, p99 %v", phase.name, kind, p50.Round(time.Millisecond), p99.Round(time.Millisecond))
		}
	}
}

// TestAgentScaleSmoke runs BenchmarkAgentScale's code on a small
// cluster: every change it makes through the API server reaches the
// agent's data path (a connection flips, a new pod's veth is enrolled, a
// deleted one's released), also while other pods change.
func TestAgentScaleSmoke(t *testing.T) {
	r := runAgentScale(t, smokeScale)
	if len(r.quiet) != smokeScale.rounds || len(r.busy) != smokeScale.rounds {
		t.Errorf("timed %d and %d changes, want %d each", len(r.quiet), len(r.busy), smokeScale.rounds)
	}
	if r.synced.rss == 0 || r.churnPeak.rss == 0 {
		t.Errorf("no resident set read: %+v, %+v", r.synced, r.churnPeak)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// percentiles returns the p50 and p99 of the changes of kind ("": all).
func percentiles(cs []timedChange, kind string) (p50, p99 time.Duration) {
	var d []time.Duration
	for _, c := range cs {
		if kind == "" || c.kind == kind {
			d = append(d, c.took)
		}
	}
	if len(d) == 0 {
		return 0, 0
	}
	slices.Sort(d)
	return d[len(d)/2], d[min(len(d)-1, (len(d)*99+99)/100-1)]
}

func runAgentScale(tb testing.TB, sc agentScale) scaleResult {
	const spare = "fresh" // the pod the new-pod changes create and delete, and its namespace
	pods := []testbed.PodSpec{
		{Name: "client", Namespace: "bench", ServiceAccount: "client"},
		{Name: "server-a", Namespace: "bench", ServiceAccount: "server", Labels: map[string]string{"app": "server-a"}},
		{Name: "server-b", Namespace: "bench", ServiceAccount: "server", Labels: map[string]string{"app": "server-b"}},
		// Not in the API server when the agent starts (the setup deletes
		// it), in a namespace the testbed's file leaves unmeshed so that
		// the mesh does not wait for it.
		{Name: spare, Namespace: spare, ServiceAccount: "app"},
	}
	for k := len(pods); k < sc.localPods; k++ {
		pods = append(pods, testbed.PodSpec{Name: "local-" + strconv.Itoa(k), Namespace: "bench", ServiceAccount: "app",
			Labels: map[string]string{"app": "local-" + strconv.Itoa(k%sc.services)}})
	}
	spec := testbed.Spec{
		Nodes:      []testbed.NodeSpec{{Name: scaleNode, Pods: pods}},
		Namespaces: map[string]map[string]string{"bench": meshedNS},
	}
	for k := range sc.services {
		name := "local-" + strconv.Itoa(k)
		spec.Services = append(spec.Services, testbed.ServiceSpec{Name: name, Namespace: "bench",
			Selector: map[string]string{"app": name}, Ports: []testbed.ServicePort{{Port: 80, TargetPort: appPort}}})
	}

	var started time.Time
	// As the chart runs it (values.yaml: logLevel info); the mesh's debug
	// level logs a line per flow. Heap profiles need the profiler on.
	args := []string{"--log-level", "info"}
	if os.Getenv("MANTLET_SCALE_PROFILES") != "" {
		args = append(args, "--memory-profile-rate", strconv.Itoa(runtime.MemProfileRate))
	}
	km := startKubeMeshWith(tb, spec, meshtest.Options{
		AgentArgs:    args,
		ReadyTimeout: 5 * time.Minute,
	}, func(ctx context.Context, km *kubeMesh, m *meshtest.Mesh) error {
		admin := km.api.Admin()
		zero := int64(0)
		if err := admin.CoreV1().Pods(spare).Delete(ctx, spare, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			return fmt.Errorf("delete the spare pod: %w", err)
		}
		if _, err := admin.CoreV1().Namespaces().Patch(ctx, spare, types.MergePatchType,
			fmt.Appendf(nil, `{"metadata":{"annotations":{%q:"enabled"}}}`, meshed), metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("mesh namespace %s: %w", spare, err)
		}
		t0 := time.Now()
		// The policies' statuses as the other nodes' agents would have
		// written them: the one agent here writes those of the bench's
		// namespace only (a policy whose writer is away is written by any
		// agent after 10 s).
		sc.fill.PolicyStatus = func(gen int64) map[string]any {
			c := mkube.AcceptedCondition(gen)
			return map[string]any{"conditions": []any{map[string]any{"type": c.Type, "status": string(c.Status), "reason": c.Reason,
				"message": c.Message, "observedGeneration": c.ObservedGeneration, "lastTransitionTime": time.Now().UTC().Format(time.RFC3339)}}}
		}
		if err := km.api.Fill(ctx, km.dyn, sc.fill); err != nil {
			return err
		}
		np, ns, npol := sc.fill.Total()
		tb.Logf("filled the API server with %d more pods, %d services and %d MeshPolicies in %v", np, ns, npol, time.Since(t0).Round(time.Second))
		mp := km.dyn.Resource(mkube.MeshPolicies).Namespace("bench")
		pols := []map[string]any{
			// Denies port 8080 of the pods labelled deny=yes: the pod
			// label changes flip it for server-a.
			{"action": "DENY", "selector": map[string]any{"matchLabels": map[string]any{"deny": "yes"}},
				"rules": []any{map[string]any{"to": map[string]any{"ports": []any{strconv.Itoa(appPort)}}}}},
			// Denies server-b's port 8081: the policy port changes move
			// it to 8080 and back.
			{"action": "DENY", "selector": map[string]any{"matchLabels": map[string]any{"app": "server-b"}},
				"rules": []any{map[string]any{"to": map[string]any{"ports": []any{strconv.Itoa(appPort + 1)}}}}},
		}
		for k := len(pols); k < sc.policies; k++ {
			pols = append(pols, map[string]any{"action": "DENY", "selector": map[string]any{"matchLabels": map[string]any{"app": "none-" + strconv.Itoa(k)}},
				"rules": []any{map[string]any{"to": map[string]any{"ports": []any{"1"}}}}})
		}
		for k, p := range pols {
			if _, err := mp.Create(ctx, meshPolicyObject("bench", "pol-"+strconv.Itoa(k), p), metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("create MeshPolicy bench/pol-%d: %w", k, err)
			}
		}
		started = time.Now()
		return nil
	})
	var res scaleResult
	res.ready = time.Since(started)
	ctx := context.Background()
	admin := km.api.Admin()
	pid, err := km.AgentPID(scaleNode)
	if err != nil {
		tb.Fatal(err)
	}
	profiles := os.Getenv("MANTLET_SCALE_PROFILES")
	time.Sleep(sc.settle)
	if res.synced, err = readProcMem(pid); err != nil {
		tb.Fatal(err)
	}
	tb.Logf("agent ready %v after its start; after %v idle: %s; Go: %s", res.ready.Round(time.Millisecond), sc.settle, res.synced, scaleGoMemory(km.Mesh))
	saveProfiles(tb, km.Mesh, profiles, "synced")

	srvA := echo(tb, km.Mesh, "server-a", appPort)
	srvB := echo(tb, km.Mesh, "server-b", appPort)
	changes := scaleChanges(tb, km, admin, srvA.Addr, srvB.Addr, sc.localPods)
	res.quiet = runChanges(tb, changes, sc.rounds)

	// The churn phase: sc.churn pod label changes a second to API-only
	// pods while the same changes are timed again.
	cctx, stop := context.WithCancel(ctx)
	var (
		made    atomic.Int64
		wg      sync.WaitGroup
		samples = make(chan procMem, 1)
	)
	cpu0, err := procCPU(pid)
	if err != nil {
		tb.Fatal(err)
	}
	t0 := time.Now()
	wg.Go(func() { churnPods(cctx, admin, sc.fill, sc.churn, &made) })
	wg.Go(func() {
		var peak procMem
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			if m, err := readProcMem(pid); err == nil && m.rss > peak.rss {
				peak = m
			}
			select {
			case <-cctx.Done():
				samples <- peak
				return
			case <-tick.C:
			}
		}
	})
	if profiles != "" {
		wg.Go(func() { saveProfile(tb, km.Mesh, filepath.Join(profiles, "churn-cpu.pb.gz"), "profile?seconds=15") })
	}
	res.busy = runChanges(tb, changes, sc.rounds)
	stop()
	wg.Wait()
	elapsed := time.Since(t0)
	cpu1, err := procCPU(pid)
	if err != nil {
		tb.Fatal(err)
	}
	res.churnPeak = <-samples
	if res.churnEnd, err = readProcMem(pid); err != nil {
		tb.Fatal(err)
	}
	res.cpu = 100 * (cpu1 - cpu0).Seconds() / elapsed.Seconds()
	res.churnRate = float64(made.Load()) / elapsed.Seconds()
	tb.Logf("churn phase, %v at %.1f pod changes a second: CPU %.1f%%, highest %s; at the end %s; Go: %s",
		elapsed.Round(time.Second), res.churnRate, res.cpu, res.churnPeak, res.churnEnd, scaleGoMemory(km.Mesh))
	saveProfiles(tb, km.Mesh, profiles, "churn")
	return res
}

// change is one timed change: an API write, and what says that the
// node's data path has it.
type change struct {
	kind  string
	write func(ctx context.Context) error
	// inForce reports whether the data path has the change; an error is
	// a probe that failed and is tried again.
	inForce func(ctx context.Context) (bool, error)
	// every is how often inForce is asked: each probe costs the agent
	// work (a connection; a status answer with the data path's check).
	every time.Duration
}

// scaleChanges returns the cycle of changes: server-a labelled deny=yes
// (refused) and unlabelled (answered), the DENY of server-b moved to its
// port 8080 (refused) and back to 8081 (answered), the spare pod created
// (enrolled: all local pods' veths attached) and deleted (released).
func scaleChanges(tb testing.TB, km *kubeMesh, c kubernetes.Interface, srvA, srvB netip.AddrPort, localPods int) []change {
	pods := c.CoreV1().Pods("bench")
	mp := km.dyn.Resource(mkube.MeshPolicies).Namespace("bench")
	spare := km.Pod("fresh")
	label := func(v string) func(context.Context) error {
		return func(ctx context.Context) error {
			_, err := pods.Patch(ctx, "server-a", types.MergePatchType, fmt.Appendf(nil, `{"metadata":{"labels":{"deny":%s}}}`, v), metav1.PatchOptions{})
			return err
		}
	}
	port := func(p int) func(context.Context) error {
		return func(ctx context.Context) error {
			_, err := mp.Patch(ctx, "pol-1", types.MergePatchType, fmt.Appendf(nil, `{"spec":{"rules":[{"to":{"ports":["%d"]}}]}}`, p), metav1.PatchOptions{})
			return err
		}
	}
	verdict := func(addr netip.AddrPort, allowed bool) func(context.Context) (bool, error) {
		return func(ctx context.Context) (bool, error) {
			got, err := probeVerdict(ctx, km.Mesh, "client", addr)
			return err == nil && got == allowed, err
		}
	}
	attached := func(n int) func(context.Context) (bool, error) {
		return func(ctx context.Context) (bool, error) {
			st, err := km.Status(ctx, scaleNode)
			return err == nil && st.Datapath.Pods == n && st.Snapshot.Enrolled == n, err
		}
	}
	return []change{
		{"pod label", label(`"yes"`), verdict(srvA, false), 10 * time.Millisecond},
		{"pod label", label("null"), verdict(srvA, true), 10 * time.Millisecond},
		{"policy port", port(appPort), verdict(srvB, false), 10 * time.Millisecond},
		{"policy port", port(appPort + 1), verdict(srvB, true), 10 * time.Millisecond},
		{"new pod", func(ctx context.Context) error {
			p, err := c.CoreV1().Pods(spare.Namespace).Create(ctx, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: spare.Namespace, Name: spare.Name},
				Spec: corev1.PodSpec{NodeName: scaleNode, ServiceAccountName: spare.ServiceAccount,
					Containers: []corev1.Container{{Name: "app", Image: "mantlet.test/app"}}}}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			ip := spare.IP.String()
			p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
			_, err = c.CoreV1().Pods(spare.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		}, attached(localPods), 25 * time.Millisecond},
		{"pod deleted", func(ctx context.Context) error {
			zero := int64(0)
			return c.CoreV1().Pods(spare.Namespace).Delete(ctx, spare.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		}, attached(localPods - 1), 25 * time.Millisecond},
	}
}

// runChanges makes n changes, cycling through cs, each once the previous
// one is in force, and times each from the start of its API write to the
// end of the probe that found it in force.
func runChanges(tb testing.TB, cs []change, n int) []timedChange {
	ctx := context.Background()
	out := make([]timedChange, 0, n)
	for i := range n {
		c := cs[i%len(cs)]
		t0 := time.Now()
		if err := c.write(ctx); err != nil {
			tb.Fatalf("change %d (%s): %v", i, c.kind, err)
		}
		deadline := t0.Add(30 * time.Second)
		var last error
		for {
			ok, err := c.inForce(ctx)
			if ok {
				break
			}
			if err != nil {
				last = err
			}
			if time.Now().After(deadline) {
				tb.Fatalf("change %d (%s): not in force within 30 s (last probe error: %v)", i, c.kind, last)
			}
			time.Sleep(c.every)
		}
		out = append(out, timedChange{c.kind, time.Since(t0)})
	}
	return out
}

// probeVerdict opens a connection from pod to addr (an echo server) and
// says whether it was answered (allowed) or closed without an answer
// (refused: the ztunnel accepts, then closes what policy denies).
func probeVerdict(ctx context.Context, m *meshtest.Mesh, pod string, addr netip.AddrPort) (allowed bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := m.Dial(ctx, pod, addr)
	if err != nil {
		return false, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "x"); err != nil {
		return false, nil // reset before the write: refused
	}
	n, err := c.Read(make([]byte, 1))
	switch {
	case n == 1:
		return true, nil
	case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET):
		return false, nil
	default:
		return false, fmt.Errorf("probe %s from %s: %w", addr, pod, err)
	}
}

// churnPods changes the label of a different API-only pod perSecond times
// a second, eight requests at most in flight (a change that finds them all
// busy is skipped), until ctx ends; made counts the changes made.
func churnPods(ctx context.Context, c kubernetes.Interface, f kubetest.Fill, perSecond int, made *atomic.Int64) {
	jobs := make(chan int, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range jobs {
				ns := f.Prefix + strconv.Itoa(i%f.Namespaces)
				pod := "pod-" + strconv.Itoa(i/f.Namespaces%f.PodsPerNamespace)
				body := fmt.Appendf(nil, `{"metadata":{"labels":{"churn":"c%d"}}}`, i)
				if _, err := c.CoreV1().Pods(ns).Patch(ctx, pod, types.MergePatchType, body, metav1.PatchOptions{}); err == nil {
					made.Add(1)
				}
			}
		})
	}
	tick := time.NewTicker(time.Second / time.Duration(perSecond))
	defer func() { tick.Stop(); close(jobs); wg.Wait() }()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		select {
		case jobs <- i:
		default:
		}
	}
}

// procMem is a process's memory as /proc says.
type procMem struct {
	// Bytes: VmRSS, VmHWM, RssFile (the binary's pages, mostly),
	// smaps_rollup Pss_Anon.
	rss, hwm, rssFile, pssAnon uint64
}

func (m procMem) String() string {
	return fmt.Sprintf("VmRSS %.1f MiB (RssFile %.1f MiB), Pss_Anon %.1f MiB, VmHWM %.1f MiB",
		float64(m.rss)/(1<<20), float64(m.rssFile)/(1<<20), float64(m.pssAnon)/(1<<20), float64(m.hwm)/(1<<20))
}

func readProcMem(pid int) (procMem, error) {
	var m procMem
	for file, fields := range map[string]map[string]*uint64{
		"status":       {"VmRSS:": &m.rss, "VmHWM:": &m.hwm, "RssFile:": &m.rssFile},
		"smaps_rollup": {"Pss_Anon:": &m.pssAnon},
	} {
		raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), file))
		if err != nil {
			return m, fmt.Errorf("memory of process %d: %w", pid, err)
		}
		sc := bufio.NewScanner(bytes.NewReader(raw))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if p, ok := fields[f[0]]; ok && len(f) >= 2 {
				kb, err := strconv.ParseUint(f[1], 10, 64)
				if err != nil {
					return m, fmt.Errorf("memory of process %d: %s: %w", pid, sc.Text(), err)
				}
				*p = kb << 10
			}
		}
	}
	return m, nil
}

// procCPU is a process's user and system time (/proc/PID/stat, in clock
// ticks of 10 ms).
func procCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, fmt.Errorf("CPU time of process %d: %w", pid, err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("CPU time of process %d: short stat %q", pid, raw)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("CPU time of process %d: %w", pid, err)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// saveProfiles writes the agent's heap and allocation profiles (from its
// admin API) to dir/<name>-heap.pb.gz and dir/<name>-allocs.pb.gz, when
// dir is set.
func saveProfiles(tb testing.TB, m *meshtest.Mesh, dir, name string) {
	if dir == "" {
		return
	}
	for _, p := range []string{"heap", "allocs"} {
		saveProfile(tb, m, filepath.Join(dir, name+"-"+p+".pb.gz"), p)
	}
}

// saveProfile writes the agent's profile /debug/pprof/<query> to file.
func saveProfile(tb testing.TB, m *meshtest.Mesh, file, query string) {
	sock := m.AdminSocket(scaleNode)
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://admin/debug/pprof/" + query)
	if err != nil {
		tb.Errorf("profile %s: %v", query, err)
		return
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("%s: %s", resp.Status, body)
	}
	if err == nil {
		err = os.WriteFile(file, body, 0o644)
	}
	if err != nil {
		tb.Errorf("profile %s: %v", query, err)
	}
}

// scaleGoMemory describes the agent's Go memory from its metrics, to read
// beside the resident set.
func scaleGoMemory(m *meshtest.Mesh) string {
	ms, err := m.Metrics(context.Background(), scaleNode)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, name := range []string{"heap_alloc", "heap_inuse", "heap_idle", "heap_released", "stack_inuse", "next_gc", "sys"} {
		v, _ := ms.Value("go_memstats_"+name+"_bytes", map[string]string{})
		fmt.Fprintf(&b, "%s %.1f MiB, ", name, v/(1<<20))
	}
	return strings.TrimSuffix(b.String(), ", ")
}
