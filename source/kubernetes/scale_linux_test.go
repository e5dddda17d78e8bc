package kubernetes

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/source"
)

// The cluster of BenchmarkScale: 10,000 pods in 100 namespaces on 20
// nodes, 1,000 services of 10 endpoints each, 1,000 MeshPolicies.
const (
	scaleNamespaces = 100
	scalePodsPerNS  = 100
	scaleNodes      = 20
	scaleSvcsPerNS  = 10
	scalePolsPerNS  = 10
	scaleChanges    = 50 // pod changes per second during the CPU window
	scaleWindow     = 20 * time.Second
)

// BenchmarkScale fills a real API server (internal/kubetest, on loopback)
// with the cluster above and measures the Kubernetes source the way an
// agent runs it, with the policy engine compiling every state it emits:
//
//   - sync-s: Initial, from start to the first complete state;
//   - heap-MB and rss-MB: the process after the sync (a garbage
//     collection first);
//   - change-p50-ms, change-p99-ms: from an API write (a pod's label, a
//     policy's port) to the state that has it compiled in the engine;
//   - cpu-%: the process's CPU time while 50 pod changes a second flow in.
//
// It ignores b.N: run it with -benchtime=1x (make bench does).
func BenchmarkScale(b *testing.B) {
	ctx := context.Background()
	api := kubetest.Start(ctx, b, kubetest.Options{})
	admin := api.Admin()
	dyn, err := dynamic.NewForConfig(api.AdminConfig())
	if err != nil {
		b.Fatal(err)
	}
	installCRDFile(b, dyn)
	start := time.Now()
	var nodes []string
	for n := range scaleNodes {
		nodes = append(nodes, "node-"+strconv.Itoa(n))
	}
	if err := api.Fill(ctx, dyn, kubetest.Fill{Prefix: "ns-", Namespaces: scaleNamespaces, PodsPerNamespace: scalePodsPerNS,
		ServicesPerNamespace: scaleSvcsPerNS, Policies: scalePolsPerNS, Nodes: nodes}); err != nil {
		b.Fatal(err)
	}
	b.Logf("filled the API server in %v", time.Since(start).Round(time.Second))

	cfg := api.AdminConfig()
	cfg.QPS, cfg.Burst = 200, 400
	src, err := New(cfg, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	eng := policy.NewEngine(policy.Options{})
	b.ResetTimer()
	start = time.Now()
	first, err := src.Initial(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if err := eng.Apply(first.Snapshot, first.Policies); err != nil {
		b.Fatal(err)
	}
	synced := time.Since(start)
	if n := len(first.Snapshot.Workloads()); n != scaleNamespaces*scalePodsPerNS {
		b.Fatalf("the first state has %d workloads, want %d", n, scaleNamespaces*scalePodsPerNS)
	}
	b.ReportMetric(synced.Seconds(), "sync-s")
	heap, rss := memory()
	b.ReportMetric(heap, "heap-MB")
	b.ReportMetric(rss, "rss-MB")

	// Every state the source emits goes through the engine, as on a node;
	// the test waits for the state that has a change in force.
	var (
		mu      sync.Mutex
		applied []*source.State
		cond    = sync.NewCond(&mu)
	)
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- src.Run(rctx, func(st *source.State) {
			if err := eng.Apply(st.Snapshot, st.Policies); err != nil {
				b.Error(err)
			}
			mu.Lock()
			applied = append(applied, st)
			cond.Broadcast()
			mu.Unlock()
		})
	}()
	defer func() { cancel(); <-done }()
	waitFor := func(ok func(*source.State) bool) {
		mu.Lock()
		defer mu.Unlock()
		for {
			if len(applied) > 0 && ok(applied[len(applied)-1]) {
				return
			}
			cond.Wait()
		}
	}

	// Latency: alternate pod label changes and policy edits.
	var lat []time.Duration
	pods := admin.CoreV1().Pods("ns-0")
	for i := range 40 {
		t0 := time.Now()
		if i%2 == 0 {
			val := "v" + strconv.Itoa(i)
			body := fmt.Appendf(nil, `{"metadata":{"labels":{"version":%q}}}`, val)
			if _, err := pods.Patch(ctx, "pod-0", types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
				b.Fatal(err)
			}
			waitFor(func(st *source.State) bool {
				w := st.Snapshot.WorkloadByUID(podUID(b, admin, "ns-0", "pod-0"))
				return w != nil && w.Labels["version"] == val
			})
		} else {
			port := strconv.Itoa(1000 + i)
			body := fmt.Appendf(nil, `{"spec":{"rules":[{"to":{"ports":[%q]}}]}}`, port)
			if _, err := dyn.Resource(MeshPolicies).Namespace("ns-0").Patch(ctx, "pol-0", types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
				b.Fatal(err)
			}
			waitFor(func(st *source.State) bool {
				for _, p := range st.Policies {
					if p.Namespace == "ns-0" && p.Name == "pol-0" && len(p.Spec.Rules) == 1 && p.Spec.Rules[0].To != nil &&
						len(p.Spec.Rules[0].To.Ports) == 1 && p.Spec.Rules[0].To.Ports[0].String() == port {
						return true
					}
				}
				return false
			})
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "change-p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "change-p99-ms")

	// CPU while pods change 50 times a second.
	cpu0 := cpuTime()
	t0 := time.Now()
	tick := time.NewTicker(time.Second / scaleChanges)
	for i := 0; time.Since(t0) < scaleWindow; i++ {
		<-tick.C
		ns := "ns-" + strconv.Itoa(i%scaleNamespaces)
		body := fmt.Appendf(nil, `{"metadata":{"labels":{"churn":"c%d"}}}`, i)
		go func() {
			_, _ = admin.CoreV1().Pods(ns).Patch(ctx, "pod-"+strconv.Itoa(i%scalePodsPerNS), types.MergePatchType, body, metav1.PatchOptions{})
		}()
	}
	tick.Stop()
	b.ReportMetric(100*(cpuTime()-cpu0).Seconds()/time.Since(t0).Seconds(), "cpu-%")
}

var podUIDs sync.Map

func podUID(b *testing.B, c kubernetes.Interface, ns, name string) string {
	if v, ok := podUIDs.Load(ns + "/" + name); ok {
		return v.(string)
	}
	p, err := c.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		b.Fatal(err)
	}
	podUIDs.Store(ns+"/"+name, string(p.UID))
	return string(p.UID)
}

// memory returns the live heap after a collection and the resident set,
// in MB, once the memory the fill freed went back to the system (the fill
// is the benchmark's, not the agent's).
func memory() (heap, rss float64) {
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap = float64(ms.HeapAlloc) / (1 << 20)
	b, err := os.ReadFile("/proc/self/status")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
				rss = kb / 1024
			}
		}
	}
	return heap, rss
}

// cpuTime is the process's user and system time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
