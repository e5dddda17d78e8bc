package kubernetes

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/source"
)

// TestSourceSaysWhenTheAPIServerIsGone: against a real API server, the
// source syncs; once the server is gone, Status says it is unreachable
// (the last state stays in force: nothing is emitted), and Run still ends
// with its context.
func TestSourceSaysWhenTheAPIServerIsGone(t *testing.T) {
	ctx := context.Background()
	api := kubetest.Start(ctx, t, kubetest.Options{})
	installCRDFile(t, dynamicFor(t, api))
	src, err := New(api.AdminConfig(), Options{Logger: slog.New(slog.NewTextHandler(t.Output(), nil)), Probe: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	st, err := src.Initial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Snapshot == nil || src.Status().Unreachable {
		t.Fatalf("after the sync: state %v, status %+v", st, src.Status())
	}
	rctx, cancel := context.WithCancel(ctx)
	emitted := make(chan *source.State, 8)
	done := make(chan error, 1)
	go func() { done <- src.Run(rctx, func(st *source.State) { emitted <- st }) }()
	if err := api.Stop(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !src.Status().Unreachable {
		if time.Now().After(deadline) {
			t.Fatalf("20 s after the API server stopped, Status() = %+v", src.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := src.Status(); len(got.Problems) == 0 || got.UnreachableSince.IsZero() {
		t.Errorf("Status() = %+v, want the problem and since when", got)
	}
	select {
	case st := <-emitted:
		t.Errorf("a state was emitted (generation %d) with the API server gone", st.Generation)
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// dynamicFor is a dynamic client of the API server's admin.
func dynamicFor(t testing.TB, api *kubetest.Server) dynamic.Interface {
	dyn, err := dynamic.NewForConfig(api.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	return dyn
}

// installCRDFile creates the MeshPolicy CRD from the chart and waits for
// it to be served.
func installCRDFile(b testing.TB, dyn dynamic.Interface) {
	raw, err := os.ReadFile("../../deploy/charts/mantlet/crds/mantlet.io_meshpolicies.yaml")
	if err != nil {
		b.Fatal(err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(raw, &obj); err != nil {
		b.Fatal(err)
	}
	gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	if _, err := dyn.Resource(gvr).Create(context.Background(), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := dyn.Resource(MeshPolicies).Namespace("default").List(context.Background(), metav1.ListOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("the MeshPolicy CRD is not served: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
