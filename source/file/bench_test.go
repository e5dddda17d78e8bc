package file

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// bigCluster returns a file of nodes×podsPerNode pods on nodes nodes, in
// 10 namespaces with a service each per 10 pods.
func bigCluster(nodes, podsPerNode int) []byte {
	var b strings.Builder
	for ns := range 10 {
		fmt.Fprintf(&b, "---\n{apiVersion: v1, kind: Namespace, metadata: {name: ns%d, annotations: {mantlet.io/mesh: enabled}}}\n", ns)
	}
	for n := 1; n <= nodes; n++ {
		fmt.Fprintf(&b, "---\n{apiVersion: v1, kind: Node, metadata: {name: node%d}, status: {addresses: [{type: InternalIP, address: 198.18.0.%d}]}}\n", n, n)
		for p := 1; p <= podsPerNode; p++ {
			fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: pod-%d-%d
  namespace: ns%d
  labels: {app: app%d}
spec:
  nodeName: node%d
  serviceAccountName: sa%d
  containers:
  - name: app
    image: app
    ports: [{name: http, containerPort: 8080}]
status:
  phase: Running
  podIP: 198.19.%d.%d
  hostIP: 198.18.0.%d
`, n, p, p%10, p%10, n, p%5, n, p, n)
		}
	}
	for s := range 10 {
		fmt.Fprintf(&b, "---\n{apiVersion: v1, kind: Service, metadata: {name: svc%d, namespace: ns%d}, spec: {clusterIP: 198.18.128.%d, selector: {app: app%d}, ports: [{port: 80, targetPort: http}]}}\n", s, s, s+1, s)
	}
	return []byte(b.String())
}

func BenchmarkParse(b *testing.B) {
	for _, size := range []struct{ nodes, pods int }{{2, 10}, {20, 50}} {
		data := bigCluster(size.nodes, size.pods)
		b.Run(fmt.Sprintf("%d_pods", size.nodes*size.pods), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				m, err := Parse("f.yaml", data, Options{})
				if err != nil {
					b.Fatal(err)
				}
				if got := len(m.Snapshot.Workloads()); got != size.nodes*size.pods {
					b.Fatalf("%d workloads", got)
				}
			}
		})
	}
}

// BenchmarkWatcherIdlePoll is what an idle agent's config watcher does
// on each poll tick: the file is unchanged and nothing happens. It should
// allocate (close to) nothing, as its garbage adds to the agent's
// resident size between collections.
func BenchmarkWatcherIdlePoll(b *testing.B) {
	for _, layout := range []string{"file", "configmap"} {
		b.Run(layout, func(b *testing.B) {
			var path string
			switch layout {
			case "file":
				path = filepath.Join(b.TempDir(), "cluster.yaml")
				if err := os.WriteFile(path, []byte(clusterWith(1)), 0o600); err != nil {
					b.Fatal(err)
				}
			case "configmap":
				c := newConfigMap(b, clusterWith(1))
				path = filepath.Join(c.dir, "cluster.yaml")
			}
			w := NewWatcher(path, slog.New(slog.DiscardHandler), WatchOptions{})
			if _, err := w.Load(); err != nil {
				b.Fatal(err)
			}
			n, err := newNotifier(path)
			if err != nil {
				b.Skipf("no change notifications here: %v", err)
			}
			defer n.close()
			apply := func(*Manifest) { b.Fatal("applied an unchanged file") }
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				now = now.Add(DefaultPoll)
				if again := w.poll(n, now, apply); again != 0 {
					b.Fatalf("an unchanged file is checked again after %v", again)
				}
			}
		})
	}
}
