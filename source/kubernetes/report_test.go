package kubernetes

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/mantlet/mantlet/source"
)

// TestReportWritesMeshedWhenTheAgentSignals: a pod the agent enrolled is
// marked Meshed when the agent signals a change, well before the next
// periodic pass; a report about a pod that was replaced by another of the
// same name never marks the new one.
func TestReportWritesMeshedWhenTheAgentSignals(t *testing.T) {
	f, _ := newFixture(t, []runtime.Object{
		node("node-1", "198.18.0.1"),
		pod("shop", "a", "a", "node-1", "198.19.1.10", nil),
		pod("shop", "b", "b", "node-1", "198.19.1.11", nil),
	})
	var reports atomic.Pointer[[]source.PodReport]
	reports.Store(&[]source.PodReport{})
	changed := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- f.src.Report(ctx, "node-1", func() []source.PodReport { return *reports.Load() }, changed)
	}()
	t.Cleanup(func() { cancel(); <-done })
	time.Sleep(50 * time.Millisecond) // the first pass, with nothing to report

	reports.Store(&[]source.PodReport{
		{Namespace: "shop", Name: "a", UID: "uid-a", Enrolled: true},
		{Namespace: "shop", Name: "b", UID: "uid-b-before", Enrolled: true}, // the old pod b
	})
	start := time.Now()
	changed <- struct{}{}
	for !meshed(t, f, "a") {
		if time.Since(start) > DefaultReportEvery/2 {
			t.Fatalf("pod a not Meshed %s after the agent signalled", time.Since(start))
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(DefaultReportEvery + 200*time.Millisecond) // a periodic pass too
	if meshed(t, f, "b") {
		t.Error("pod b (uid-b) was marked Meshed for the report of another pod of that name (uid-b-before)")
	}
}

func meshed(t *testing.T, f *fixture, name string) bool {
	t.Helper()
	p, err := f.client.CoreV1().Pods("shop").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range p.Status.Conditions {
		if c.Type == ConditionMeshed {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
