package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/agent"
	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/source"
	"github.com/mantlet/mantlet/source/file"
)

// fakeKernel is the machine for tests of the wiring: an in-memory data
// path, listeners on loopback, one uplink, veths by pod address.
type fakeKernel struct {
	dp        *fakeDatapath
	failHBONE bool // Listen fails for the HBONE listener
}

func (k *fakeKernel) OpenDatapath(_ context.Context, cfg bpf.Config, _ *slog.Logger) (Datapath, error) {
	k.dp.mu.Lock()
	defer k.dp.mu.Unlock()
	k.dp.opened, k.dp.cfg = true, cfg
	return k.dp, nil
}

func (k *fakeKernel) Listen(ctx context.Context, addr string, _ uint32) (net.Listener, error) {
	if k.failHBONE && addr == hboneTestAddr {
		return nil, errors.New("bind: address already in use")
	}
	var lc net.ListenConfig
	return lc.Listen(ctx, "tcp", "127.0.0.1:0")
}

func (k *fakeKernel) InterfaceAddrs() ([]netip.Addr, error) {
	return []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("198.18.0.1")}, nil
}

func (k *fakeKernel) FindUplinks([]netip.Addr) ([]string, error) { return []string{"eth0"}, nil }

func (k *fakeKernel) Links() (agent.LinkFinder, func(), error) { return fakeLinks{}, func() {}, nil }

func (k *fakeKernel) Plaintext([]netip.Addr) (agent.PlaintextCloser, func(), error) {
	return nil, func() {}, nil
}

// fakeLinks puts pod 198.19.1.N on ifindex 100+N.
type fakeLinks struct{}

func (fakeLinks) PodLink(ip netip.Addr) (int, error) { return 100 + int(ip.As4()[3]), nil }

const hboneTestAddr = "hbone:15008"

// fakeDatapath records what the node does to its data path.
type fakeDatapath struct {
	mu        sync.Mutex
	cfg       bpf.Config
	opened    bool
	created   bool
	closed    bool
	removed   bool
	uplinks   []string
	listeners []bpf.Slot
	pods      map[int]bpf.Pod
	changed   chan struct{}
}

func newFakeDatapath() *fakeDatapath {
	return &fakeDatapath{pods: map[int]bpf.Pod{}, changed: make(chan struct{}, 1)}
}

func (d *fakeDatapath) note() {
	select {
	case d.changed <- struct{}{}:
	default:
	}
}

func (d *fakeDatapath) EnrollPod(p bpf.Pod) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pods[p.HostIfindex] = p
	d.note()
	return nil
}

func (d *fakeDatapath) UnenrollPod(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.pods, ifindex)
	d.note()
	return nil
}

func (d *fakeDatapath) SetLocalPod(netip.Addr, bool) error { return nil }

func (d *fakeDatapath) EnrolledPods() []int { return d.Status().Pods }

func (d *fakeDatapath) Status() bpf.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	var st bpf.Status
	st.SkLookupAttached = true
	st.Listeners = slices.Clone(d.listeners)
	for i := range d.pods {
		st.Pods = append(st.Pods, i)
	}
	slices.Sort(st.Pods)
	return st
}

func (d *fakeDatapath) AttachUplink(ifname string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.uplinks = append(d.uplinks, ifname)
	return nil
}

func (d *fakeDatapath) SetListener(slot bpf.Slot, _ syscall.Conn) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.listeners = append(d.listeners, slot)
	return nil
}

func (d *fakeDatapath) Counters() (bpf.Counters, error) { return bpf.Counters{}, nil }
func (d *fakeDatapath) Repairs() map[bpf.Fault]uint64   { return nil }

func (d *fakeDatapath) Watch(ctx context.Context, _ time.Duration) error {
	<-ctx.Done()
	return nil
}

func (d *fakeDatapath) Created() bool { return d.created }

func (d *fakeDatapath) Remove(context.Context) (bpf.CleanupReport, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.removed = true
	return bpf.CleanupReport{PinDir: d.cfg.PinDir, Found: true, PinsRemoved: true}, nil
}

func (d *fakeDatapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	return nil
}

func (d *fakeDatapath) enrolled() []int {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []int
	for i := range d.pods {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}

const clusterHead = `
apiVersion: v1
kind: Node
metadata: {name: node1}
status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {mantlet.io/mesh: enabled}}
`

func pod(name string, ip int) string {
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: %s}
spec: {nodeName: node1}
status: {podIP: 198.19.1.%d}
`, name, ip)
}

const denyPolicy = `---
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: deny-8080}
spec:
  action: DENY
  rules: [{to: {ports: ["8080"]}}]
`

// testNode is a node.Config over a fake kernel and a cluster file.
type testNode struct {
	cfg    Config
	k      *fakeKernel
	file   string
	socket string
}

func newTestNode(t *testing.T, cluster string) *testNode {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "cluster.yaml")
	writeAtomically(t, path, cluster)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	authority, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	k := &fakeKernel{dp: newFakeDatapath()}
	bcfg := bpf.DefaultConfig("node1")
	bcfg.PinDir = filepath.Join(bpf.DefaultPinRoot, "test-node1")
	n := &testNode{k: k, file: path, socket: filepath.Join(dir, filepath.Base(bcfg.PinDir), "admin.sock")}
	n.cfg = Config{
		Node: "node1", Issuer: authority, TrustDomain: td,
		Source:       file.New(path, log, file.WatchOptions{Debounce: time.Millisecond, Poll: 50 * time.Millisecond}),
		Datapath:     bcfg,
		OutboundAddr: "outbound:15001", HBONEAddr: hboneTestAddr,
		DrainTimeout: time.Second,
		Observe:      ObserveConfig{AdminSocket: filepath.Join(dir, NodePlaceholder, "admin.sock"), FlowLogSize: 16, FlushEvery: time.Second},
		Policy:       PolicyConfig{SecurityEvents: "-", EventsRate: 100, Stderr: t.Output()},
		CleanupHint:  "mantlet agent --cleanup",
		Logger:       log,
		Kernel:       k,
	}
	return n
}

func writeAtomically(t *testing.T, path, data string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// start runs the node until the test ends; the returned stop ends it and
// returns Run's error.
func (n *testNode) start(t *testing.T) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- Run(ctx, n.cfg) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-errc })
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// status asks the node's admin API, waiting for it to come up.
func (n *testNode) status(t *testing.T, until func(admin.Status) bool) admin.Status {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var (
		st  admin.Status
		err error
	)
	for time.Now().Before(deadline) {
		var c *admin.Client
		if c, err = admin.NewClient(n.socket); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err = c.Status(ctx)
			cancel()
			c.Close()
			if err == nil && until(st) {
				return st
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("admin status never as wanted: last %+v (%v)", st, err)
	return st
}

// TestRunWiresANode runs a whole node on a fake kernel: it gets ready with
// its pod enrolled, the listeners in their slots and the uplink attached;
// an edit of the source enrolls and un-enrolls pods and puts a policy in
// force; the end leaves the data path pinned (closed, not removed).
func TestRunWiresANode(t *testing.T) {
	n := newTestNode(t, clusterHead+pod("a", 10))
	stop := n.start(t)
	st := n.status(t, func(st admin.Status) bool { return st.Ready && st.Snapshot.Enrolled == 1 })
	if st.Config.Source != "file" || st.Config.File != n.file {
		t.Errorf("status names the source %q %q, want file %s", st.Config.Source, st.Config.File, n.file)
	}
	dp := n.k.dp
	if got := dp.enrolled(); !slices.Equal(got, []int{110}) {
		t.Errorf("enrolled veths %v, want [110]", got)
	}
	dp.mu.Lock()
	if !slices.Equal(dp.uplinks, []string{"eth0"}) || !slices.Equal(dp.listeners, []bpf.Slot{bpf.Outbound, bpf.HBONE}) {
		t.Errorf("uplinks %v, listeners %v; want eth0 and the outbound and HBONE slots", dp.uplinks, dp.listeners)
	}
	if !slices.Contains(dp.cfg.NodeIPs, netip.MustParseAddr("198.18.0.1")) || slices.Contains(dp.cfg.NodeIPs, netip.MustParseAddr("127.0.0.1")) {
		t.Errorf("node addresses given to the data path: %v", dp.cfg.NodeIPs)
	}
	dp.mu.Unlock()

	writeAtomically(t, n.file, clusterHead+pod("b", 11)+denyPolicy)
	st = n.status(t, func(st admin.Status) bool {
		return st.Policy.Policies == 1 && st.Snapshot.Enrolled == 1 && st.Snapshot.Workloads == 1
	})
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(dp.enrolled(), []int{111}) {
		if time.Now().After(deadline) {
			t.Fatalf("after the edit the enrolled veths are %v, want [111]", dp.enrolled())
		}
		select {
		case <-dp.changed:
		case <-time.After(100 * time.Millisecond):
		}
	}

	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if !dp.closed || dp.removed {
		t.Errorf("after a clean stop the data path was closed=%v removed=%v; want closed and kept", dp.closed, dp.removed)
	}
}

// TestRunRollsBackAFailedStart: a listener that cannot be opened fails the
// start after the data path was made, and the node removes it.
func TestRunRollsBackAFailedStart(t *testing.T) {
	n := newTestNode(t, clusterHead+pod("a", 10))
	n.k.failHBONE = true
	n.k.dp.created = true
	err := Run(context.Background(), n.cfg)
	if err == nil || !strings.Contains(err.Error(), "listen "+hboneTestAddr+" (hbone): bind: address already in use") {
		t.Fatalf("Run = %v, want the HBONE listener's error", err)
	}
	if !n.k.dp.removed || !n.k.dp.closed {
		t.Errorf("after the failed start removed=%v closed=%v, want the data path removed", n.k.dp.removed, n.k.dp.closed)
	}
	if _, err := os.Stat(filepath.Dir(n.socket)); !os.IsNotExist(err) {
		t.Errorf("the admin socket's directory outlives the failed start: %v", err)
	}
}

// TestRunKeepsAnAdoptedDataPathOnAFailedStart: a data path the node
// adopted protects the pods of the agent before; a failed start keeps it.
func TestRunKeepsAnAdoptedDataPathOnAFailedStart(t *testing.T) {
	n := newTestNode(t, clusterHead+pod("a", 10))
	n.k.failHBONE = true
	if err := Run(context.Background(), n.cfg); err == nil {
		t.Fatal("Run succeeded with its HBONE port taken")
	}
	if n.k.dp.removed || !n.k.dp.closed {
		t.Errorf("removed=%v closed=%v, want the adopted data path closed and kept", n.k.dp.removed, n.k.dp.closed)
	}
}

// TestRunRefusesAnUnknownNodeBeforeTheKernel: a node name the state does
// not know fails before the data path is opened, naming the known nodes.
func TestRunRefusesAnUnknownNodeBeforeTheKernel(t *testing.T) {
	n := newTestNode(t, clusterHead+pod("a", 10))
	n.cfg.Node = "nodeone"
	err := Run(context.Background(), n.cfg)
	if want := "--node-name nodeone: " + n.file + " has no node of this name; its nodes are node1"; err == nil || err.Error() != want {
		t.Fatalf("Run = %v, want %q", err, want)
	}
	if n.k.dp.opened {
		t.Error("the data path was opened for an unknown node")
	}
}

// unreachableSource is a file source whose Status says the source cannot
// be read since a time the test sets, as the Kubernetes source does while
// the API server does not answer.
type unreachableSource struct {
	source.Source
	mu    sync.Mutex
	since time.Time
}

func (u *unreachableSource) set(since time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.since = since
}

func (u *unreachableSource) Status() source.Status {
	st := u.Source.Status()
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.since.IsZero() {
		st.Unreachable, st.UnreachableSince = true, u.since
	}
	return st
}

// TestRunSaysWhenTheSourceIsUnreachable: while the source cannot be read
// the node keeps its state in force and says so in its status; it stays
// ready for the grace period, then reports not-ready with the reason, and
// ready again once the source answers.
func TestRunSaysWhenTheSourceIsUnreachable(t *testing.T) {
	n := newTestNode(t, clusterHead+pod("a", 10))
	src := &unreachableSource{Source: n.cfg.Source}
	n.cfg.Source = src
	n.cfg.SourceGrace = time.Minute
	n.start(t)
	n.status(t, func(st admin.Status) bool { return st.Ready && st.Snapshot.Enrolled == 1 })

	src.set(time.Now())
	st := n.status(t, func(st admin.Status) bool { return st.Config.Unreachable })
	if !st.Ready || st.Snapshot.Enrolled != 1 || !strings.Contains(strings.Join(st.Problems, "\n"), "unreachable since") {
		t.Errorf("within the grace period: ready %v (%s), enrolled %d, problems %q; want ready, the pod enrolled, the problem listed",
			st.Ready, st.Reason, st.Snapshot.Enrolled, st.Problems)
	}

	src.set(time.Now().Add(-2 * time.Minute))
	st = n.status(t, func(st admin.Status) bool { return !st.Ready })
	if !strings.Contains(st.Reason, "unreachable for") || st.Snapshot.Enrolled != 1 {
		t.Errorf("past the grace period: reason %q, enrolled %d; want the source named and the pod still enrolled", st.Reason, st.Snapshot.Enrolled)
	}

	src.set(time.Time{})
	n.status(t, func(st admin.Status) bool { return st.Ready && !st.Config.Unreachable })
}
