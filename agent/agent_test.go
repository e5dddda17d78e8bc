package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// fakeDatapath is an in-memory data path. failEnroll[ifindex] makes that
// many EnrollPod calls for the veth fail.
type fakeDatapath struct {
	mu         sync.Mutex
	pods       map[int]bpf.Pod
	calls      []string
	failEnroll map[int]int
	failUnenr  map[int]int
	local      map[netip.Addr]bool
	failLocal  int
	panicOnce  bool
	ready      bool
	block      chan struct{} // if set, EnrollPod signals blocked and waits for block to close
	blocked    chan struct{}
}

func newFakeDatapath(pinned ...int) *fakeDatapath {
	d := &fakeDatapath{pods: map[int]bpf.Pod{}, failEnroll: map[int]int{}, failUnenr: map[int]int{}, local: map[netip.Addr]bool{}, ready: true}
	for _, i := range pinned {
		d.pods[i] = bpf.Pod{HostIfindex: i}
	}
	return d
}

func (d *fakeDatapath) EnrollPod(p bpf.Pod) error {
	if d.block != nil {
		select {
		case d.blocked <- struct{}{}:
		default:
		}
		<-d.block
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.panicOnce {
		d.panicOnce = false
		panic("fake datapath bug")
	}
	d.calls = append(d.calls, fmt.Sprintf("enroll %d", p.HostIfindex))
	if d.failEnroll[p.HostIfindex] > 0 {
		d.failEnroll[p.HostIfindex]--
		return errors.New("attach: device busy")
	}
	d.pods[p.HostIfindex] = p
	return nil
}

func (d *fakeDatapath) UnenrollPod(ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, fmt.Sprintf("unenroll %d", ifindex))
	if d.failUnenr[ifindex] > 0 {
		d.failUnenr[ifindex]--
		return errors.New("detach: busy")
	}
	if _, ok := d.pods[ifindex]; !ok {
		return fmt.Errorf("veth %d not enrolled", ifindex)
	}
	delete(d.pods, ifindex)
	return nil
}

func (d *fakeDatapath) SetLocalPod(ip netip.Addr, on bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failLocal > 0 {
		d.failLocal--
		return errors.New("map full")
	}
	if on {
		d.local[ip] = true
	} else {
		delete(d.local, ip)
	}
	return nil
}

// localPods returns the addresses marked local for the uplink, sorted.
func (d *fakeDatapath) localPods() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []string{}
	for ip := range d.local {
		out = append(out, ip.String())
	}
	slices.Sort(out)
	return out
}

func (d *fakeDatapath) EnrolledPods() []int { return d.Status().Pods }

func (d *fakeDatapath) Status() bpf.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := bpf.Status{SkLookupAttached: d.ready}
	if d.ready {
		st.Listeners = []bpf.Slot{bpf.Outbound, bpf.HBONE}
	}
	for i := range d.pods {
		st.Pods = append(st.Pods, i)
	}
	slices.Sort(st.Pods)
	return st
}

// enrolled returns "ifindex:ip[:strict]" for every enrolled veth, sorted.
func (d *fakeDatapath) enrolled() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for i, p := range d.pods {
		s := fmt.Sprint(i)
		if len(p.IPs) > 0 {
			s += ":" + p.IPs[0].String()
		}
		if p.Strict {
			s += ":strict"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func (d *fakeDatapath) callLog() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.calls)
}

// fakeLinks maps pod IPs to veths; fail[ip] makes that many lookups fail.
type fakeLinks struct {
	mu    sync.Mutex
	veths map[netip.Addr]int
	fail  map[netip.Addr]int
	asked map[netip.Addr]int // lookups made, by address (when not nil)
}

func (l *fakeLinks) PodLink(ip netip.Addr) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.asked != nil {
		l.asked[ip]++
	}
	if l.fail[ip] > 0 {
		l.fail[ip]--
		return 0, fmt.Errorf("route to %s: network unreachable", ip)
	}
	i, ok := l.veths[ip]
	if !ok {
		return 0, fmt.Errorf("route to %s: no veth", ip)
	}
	return i, nil
}

func (l *fakeLinks) set(ip string, ifindex int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.veths[netip.MustParseAddr(ip)] = ifindex
}

type fakeIdentities struct {
	mu  sync.Mutex
	ids map[string]bool
	log []string
}

func (f *fakeIdentities) Prefetch(id spiffeid.ID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ids[id.String()] = true
	f.log = append(f.log, "prefetch "+id.String())
}

func (f *fakeIdentities) Forget(id spiffeid.ID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ids, id.String())
	f.log = append(f.log, "forget "+id.String())
}

func (f *fakeIdentities) held() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for id := range f.ids {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

type rig struct {
	agent *Agent
	dp    *fakeDatapath
	links *fakeLinks
	ids   *fakeIdentities
	store *workload.Store
}

// newRig runs an agent for node-1 over fakes until the test ends. The
// veths of the pods 198.19.1.<n> are ifindex 100+n.
func newRig(t *testing.T, dp *fakeDatapath) *rig {
	t.Helper()
	r := &rig{
		dp:    dp,
		links: &fakeLinks{veths: map[netip.Addr]int{}, fail: map[netip.Addr]int{}},
		ids:   &fakeIdentities{ids: map[string]bool{}},
		store: workload.NewStore(),
	}
	for n := 1; n < 20; n++ {
		r.links.set(fmt.Sprintf("198.19.1.%d", n), 100+n)
	}
	a, err := New(Config{
		Node: "node-1", Datapath: dp, Links: r.links, Identities: r.ids, Store: r.store,
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond, Resync: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.agent = a
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// pod describes a workload compactly: "ns/name@node=ip" plus flags.
type pod struct {
	id, node, ip string
	sa           string
	enrolled     bool
}

func state(t testing.TB, mtls map[string]v1alpha1.MTLSMode, pods ...pod) State {
	t.Helper()
	var ws []workload.Workload
	for _, p := range pods {
		ns, name, _ := strings.Cut(p.id, "/")
		ws = append(ws, workload.Workload{UID: p.id, Name: name, Namespace: ns, ServiceAccount: p.sa, Node: p.node,
			IPs: []netip.Addr{netip.MustParseAddr(p.ip)}, Enrolled: p.enrolled})
	}
	s, err := workload.New(nil, ws, nil)
	if err != nil {
		t.Fatal(err)
	}
	return State{Snapshot: s, MTLS: mtls}
}

// eventually polls cond for up to 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantEnrolled(t *testing.T, dp *fakeDatapath, want ...string) {
	t.Helper()
	if want == nil {
		want = []string{}
	}
	var got []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = dp.enrolled()
		if got == nil {
			got = []string{}
		}
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("enrolled veths = %v, want %v; calls %v", got, want, dp.callLog())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantLocal(t *testing.T, dp *fakeDatapath, want ...string) {
	t.Helper()
	if want == nil {
		want = []string{}
	}
	eventually(t, fmt.Sprintf("the uplink's local pods are %v (now %v)", want, dp.localPods()), func() bool {
		return slices.Equal(dp.localPods(), want)
	})
}

func TestAgentEnrollsOnlyLocalMeshedPods(t *testing.T) {
	r := newRig(t, newFakeDatapath())
	st := state(t, nil,
		pod{"shop/frontend", "node-1", "198.19.1.1", "web", true},
		pod{"shop/debug", "node-1", "198.19.1.2", "", false}, // opted out, or namespace not meshed
		pod{"shop/checkout", "node-2", "198.19.2.1", "", true},
	)
	r.agent.Apply(st)
	wantEnrolled(t, r.dp, "101:198.19.1.1")
	wantLocal(t, r.dp, "198.19.1.1")
	eventually(t, "the ztunnel's store holds the snapshot", func() bool { return r.store.Load() == st.Snapshot })
	// The identities are asked for once the pass that enrolled the pod
	// ends; the veth is enrolled within it, so this waits for that end.
	web := []string{"spiffe://cluster.local/ns/shop/sa/web"}
	eventually(t, "the identities prefetched are only the local enrolled pod's", func() bool {
		return slices.Equal(r.ids.held(), web)
	})
	time.Sleep(120 * time.Millisecond) // two resyncs
	if calls := r.dp.callLog(); !slices.Equal(calls, []string{"enroll 101"}) {
		t.Fatalf("data path calls = %v; resyncs must not re-enroll an unchanged pod", calls)
	}
	if got := r.ids.held(); !slices.Equal(got, web) {
		t.Fatalf("identities held after two resyncs = %v, want only the local enrolled pod's", got)
	}
}

func TestAgentFollowsEditsOfTheDesiredState(t *testing.T) {
	r := newRig(t, newFakeDatapath())
	r.agent.Apply(state(t, nil,
		pod{"shop/a", "node-1", "198.19.1.1", "a", true},
		pod{"shop/b", "node-1", "198.19.1.2", "b", true},
		pod{"shop/c", "node-1", "198.19.1.3", "c", true},
	))
	wantEnrolled(t, r.dp, "101:198.19.1.1", "102:198.19.1.2", "103:198.19.1.3")

	// a stays, b opts out, c is deleted, d appears; shop goes STRICT.
	r.agent.Apply(state(t, map[string]v1alpha1.MTLSMode{"shop": v1alpha1.MTLSStrict},
		pod{"shop/a", "node-1", "198.19.1.1", "a", true},
		pod{"shop/b", "node-1", "198.19.1.2", "b", false},
		pod{"shop/d", "node-1", "198.19.1.4", "a", true},
	))
	wantEnrolled(t, r.dp, "101:198.19.1.1:strict", "104:198.19.1.4:strict")
	wantLocal(t, r.dp, "198.19.1.1", "198.19.1.4")
	eventually(t, "identities b and c are forgotten", func() bool {
		return slices.Equal(r.ids.held(), []string{"spiffe://cluster.local/ns/shop/sa/a"})
	})

	r.agent.Apply(state(t, nil))
	wantEnrolled(t, r.dp)
	wantLocal(t, r.dp)
}

func TestAgentRetriesFailuresWithoutBlockingOtherPods(t *testing.T) {
	dp := newFakeDatapath()
	dp.failEnroll[102] = 3
	dp.failLocal = 2
	r := newRig(t, dp)
	r.links.fail[netip.MustParseAddr("198.19.1.1")] = 3
	r.agent.Apply(state(t, nil,
		pod{"shop/a", "node-1", "198.19.1.1", "", true},
		pod{"shop/b", "node-1", "198.19.1.2", "", true},
		pod{"shop/c", "node-1", "198.19.1.3", "", true},
	))
	wantEnrolled(t, dp, "101:198.19.1.1", "102:198.19.1.2", "103:198.19.1.3")
	wantLocal(t, dp, "198.19.1.1", "198.19.1.2", "198.19.1.3")
	// Pods reports the end of the last pass: wait for the pass that
	// enrolled the last of them to end.
	eventually(t, "every pod reports enrolled with no error", func() bool {
		pods := r.agent.Pods()
		for _, p := range pods {
			if p.Err != "" || p.Ifindex == 0 {
				return false
			}
		}
		return len(pods) == 3
	})
}

func TestAgentForgetsAFailureOnceAPassSucceeds(t *testing.T) {
	// Pod a is enrolled; a later resync cannot find its veth once. The
	// next pass finds everything in place and does nothing: the pod must
	// no longer report the failure, nor count as pending.
	r := newRig(t, newFakeDatapath())
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	wantEnrolled(t, r.dp, "101:198.19.1.1")
	r.links.mu.Lock()
	r.links.fail[netip.MustParseAddr("198.19.1.1")] = 1
	r.links.mu.Unlock()
	eventually(t, "the lookup failed once", func() bool {
		r.links.mu.Lock()
		defer r.links.mu.Unlock()
		return r.links.fail[netip.MustParseAddr("198.19.1.1")] == 0
	})
	eventually(t, "the pod reports no failure", func() bool {
		ps := r.agent.Pods()
		return len(ps) == 1 && ps[0].Err == "" && ps[0].Ifindex == 101
	})
	if calls := r.dp.callLog(); !slices.Equal(calls, []string{"enroll 101"}) {
		t.Fatalf("data path calls = %v; an unchanged pod must not be enrolled again", calls)
	}
}

func TestAgentReportsPodsItCannotEnroll(t *testing.T) {
	r := newRig(t, newFakeDatapath())
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.9.9", "", true}))
	eventually(t, "the pod reports why it is not enrolled", func() bool {
		ps := r.agent.Pods()
		return len(ps) == 1 && ps[0].Err == "find veth: route to 198.19.9.9: no veth"
	})
	r.links.set("198.19.9.9", 109) // the pod's veth appears
	wantEnrolled(t, r.dp, "109:198.19.9.9")
}

func TestAgentAdoptsPinnedVethsAndRemovesStaleOnes(t *testing.T) {
	// A previous agent left veths 101 (pod a, still wanted) and 105 (a pod
	// deleted while no agent ran) enrolled.
	dp := newFakeDatapath(101, 105)
	r := newRig(t, dp)
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	wantEnrolled(t, dp, "101:198.19.1.1")
	if calls := dp.callLog(); !slices.Equal(calls, []string{"enroll 101", "unenroll 105"}) {
		t.Fatalf("calls = %v, want pod a's veth updated in place and the stale one removed", calls)
	}
}

func TestAgentKeepsPinnedVethsWhileAPodIsUnresolved(t *testing.T) {
	// After a restart, pod a's route lookup fails for a while: its pinned
	// veth must stay enrolled (un-enrolling would leave it unprotected).
	dp := newFakeDatapath(101)
	r := newRig(t, dp)
	r.links.fail[netip.MustParseAddr("198.19.1.1")] = 1 << 30
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	eventually(t, "a few failed lookups", func() bool {
		ps := r.agent.Pods()
		return len(ps) == 1 && ps[0].Err != ""
	})
	time.Sleep(100 * time.Millisecond)
	if calls := dp.callLog(); len(calls) != 0 {
		t.Fatalf("calls = %v, want none while the pod is unresolved", calls)
	}
}

func TestAgentMovesAPodToItsNewVeth(t *testing.T) {
	r := newRig(t, newFakeDatapath())
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	wantEnrolled(t, r.dp, "101:198.19.1.1")
	r.links.set("198.19.1.1", 201) // the pod's sandbox was recreated: new veth
	wantEnrolled(t, r.dp, "201:198.19.1.1")
	if calls := r.dp.callLog(); !slices.Equal(calls, []string{"enroll 101", "enroll 201", "unenroll 101"}) {
		t.Fatalf("calls = %v, want the old veth un-enrolled right after the new one was enrolled", calls)
	}
}

func TestAgentLooksUpOnlyTheVethsOfChangedPodsUntilAResync(t *testing.T) {
	// Passes are driven by hand: a state that changes one pod costs one
	// route lookup, not one per local pod; the resync still checks all.
	links := &fakeLinks{veths: map[netip.Addr]int{}, fail: map[netip.Addr]int{}, asked: map[netip.Addr]int{}}
	for n := 1; n <= 3; n++ {
		links.set(fmt.Sprintf("198.19.1.%d", n), 100+n)
	}
	dp := newFakeDatapath()
	ids := &fakeIdentities{ids: map[string]bool{}}
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: links, Identities: ids, Resync: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	pods := []pod{
		{"shop/a", "node-1", "198.19.1.1", "", true},
		{"shop/b", "node-1", "198.19.1.2", "", true},
		{"shop/c", "node-1", "198.19.1.3", "", true},
	}
	t0 := time.Now()
	a.Apply(state(t, nil, pods...))
	a.reconcile(t.Context(), t0)
	lookups := func() map[string]int {
		links.mu.Lock()
		defer links.mu.Unlock()
		out := map[string]int{}
		for ip, n := range links.asked {
			out[ip.String()] = n
		}
		clear(links.asked)
		return out
	}
	if got := lookups(); len(got) != 3 {
		t.Fatalf("first pass looked up %v, want every pod once", got)
	}
	pods[1].sa = "other"                                                 // b's identity changes: no veth to find again
	pods = append(pods, pod{"shop/d", "node-1", "198.19.1.4", "", true}) // a new pod
	links.set("198.19.1.4", 104)
	a.Apply(state(t, nil, pods...))
	a.reconcile(t.Context(), t0.Add(time.Second))
	if got, want := lookups(), map[string]int{"198.19.1.4": 1}; !maps.Equal(got, want) {
		t.Fatalf("a pass for a new state looked up %v, want %v", got, want)
	}
	if ps := a.Pods(); len(ps) != 4 || ps[3].Ifindex != 104 {
		t.Fatalf("pods = %+v, want four, d enrolled", ps)
	}
	if got := ids.held(); !slices.Contains(got, "spiffe://cluster.local/ns/shop/sa/other") {
		t.Fatalf("identities %v, want b's new one", got)
	}
	// Drift the pass did not look for: a's sandbox has a new veth. The
	// resync finds it, also while states keep coming.
	links.set("198.19.1.1", 201)
	a.Apply(state(t, nil, pods...))
	a.reconcile(t.Context(), t0.Add(2*time.Second))
	if got := lookups(); len(got) != 0 {
		t.Fatalf("a pass for an unchanged state looked up %v, want nothing", got)
	}
	a.Apply(state(t, nil, pods...))
	if next := a.reconcile(t.Context(), t0.Add(time.Minute)); !next.Equal(t0.Add(2 * time.Minute)) {
		t.Errorf("next pass due %v after the start, want 2m", next.Sub(t0))
	}
	if got := lookups(); len(got) != 4 {
		t.Fatalf("the resync looked up %v, want every pod", got)
	}
	wantEnrolled(t, dp, "102:198.19.1.2", "103:198.19.1.3", "104:198.19.1.4", "201:198.19.1.1")
}

// versionedLinks is fakeLinks that tells when its answers may have
// changed (LinkChanges), as RouteLinks does.
type versionedLinks struct {
	*fakeLinks
	version uint64
	known   bool
}

func (l *versionedLinks) LinksVersion() (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.version, l.known
}

// change moves the pod at ip to the veth ifindex and bumps the version,
// as a recreated sandbox's route does.
func (l *versionedLinks) change(ip string, ifindex int) {
	l.set(ip, ifindex)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.version++
}

func TestAgentResyncLooksUpVethsOnlyAfterALinkOrRouteChanged(t *testing.T) {
	// Passes are driven by hand: with Links that follow the node's
	// changes, a resync with nothing changed looks nothing up; one after a
	// change, or a Recheck, looks up every pod and moves a pod to its new
	// veth; a veth the data path lost is enrolled again without waiting
	// for a change, and one a panic broke off is made again.
	links := &versionedLinks{fakeLinks: &fakeLinks{veths: map[netip.Addr]int{}, fail: map[netip.Addr]int{}, asked: map[netip.Addr]int{}}, known: true}
	for n := 1; n <= 3; n++ {
		links.set(fmt.Sprintf("198.19.1.%d", n), 100+n)
	}
	dp := newFakeDatapath()
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: links, Resync: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	a.Apply(state(t, nil,
		pod{"shop/a", "node-1", "198.19.1.1", "", true},
		pod{"shop/b", "node-1", "198.19.1.2", "", true},
		pod{"shop/c", "node-1", "198.19.1.3", "", true}))
	now := time.Now()
	pass := func(what string, wantLookups int) {
		t.Helper()
		now = now.Add(time.Minute)
		a.reconcile(t.Context(), now)
		links.mu.Lock()
		n := 0
		for _, k := range links.asked {
			n += k
		}
		clear(links.asked)
		links.mu.Unlock()
		if n != wantLookups {
			t.Fatalf("%s: %d veth lookups, want %d", what, n, wantLookups)
		}
	}
	pass("the first pass", 3)
	pass("a resync with nothing changed", 0)
	pass("another one", 0)

	links.change("198.19.1.1", 201) // a's sandbox was made again
	pass("the resync after a route changed", 3)
	wantEnrolled(t, dp, "102:198.19.1.2", "103:198.19.1.3", "201:198.19.1.1")
	pass("the resync after that", 0)

	links.set("198.19.1.2", 202) // b's, with its notification not seen yet
	a.Recheck()
	pass("a Recheck", 3)
	wantEnrolled(t, dp, "103:198.19.1.3", "201:198.19.1.1", "202:198.19.1.2")

	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(dp.UnenrollPod(103)) // the data path lost c's veth
	pass("the resync after the data path lost a veth", 1)
	wantEnrolled(t, dp, "103:198.19.1.3", "201:198.19.1.1", "202:198.19.1.2")

	// A pass that breaks off (a panicking data path) before it moved a
	// pod to its new veth leaves the lookups to the next one.
	links.change("198.19.1.3", 203)
	dp.mu.Lock()
	dp.panicOnce = true
	dp.mu.Unlock()
	pass("the resync that panics", 3)
	pass("the resync after it", 3)
	wantEnrolled(t, dp, "201:198.19.1.1", "202:198.19.1.2", "203:198.19.1.3")
	pass("the resync after that", 0)

	links.mu.Lock()
	links.known = false // the changes can no longer be followed
	links.mu.Unlock()
	pass("a resync when changes cannot be told", 3)
	pass("the next one", 3)
}

func TestAgentKeepsAVethThatChangesHands(t *testing.T) {
	// Pod a leaves and pod b arrives with a's address (so a's veth) in the
	// same edit, while un-enrolling a's veth fails once: b must end up
	// enrolled, and a's pending removal must not un-enroll b later.
	dp := newFakeDatapath()
	r := newRig(t, dp)
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	wantEnrolled(t, dp, "101:198.19.1.1")
	dp.mu.Lock()
	dp.failUnenr[101] = 1
	dp.mu.Unlock()
	r.agent.Apply(state(t, nil, pod{"shop/b", "node-1", "198.19.1.1", "", true}))
	eventually(t, "b is enrolled", func() bool {
		ps := r.agent.Pods()
		return len(ps) == 1 && ps[0].Pod == "shop/b" && ps[0].Ifindex == 101 && ps[0].Err == ""
	})
	time.Sleep(150 * time.Millisecond) // retries and resyncs
	if calls := dp.callLog(); !slices.Equal(calls, []string{"enroll 101", "unenroll 101", "enroll 101"}) {
		t.Fatalf("calls = %v, want one failed un-enroll and b's enrollment, nothing after", calls)
	}
	wantEnrolled(t, dp, "101:198.19.1.1")
	wantLocal(t, dp, "198.19.1.1")
}

func TestAgentSurvivesAPanickingDatapath(t *testing.T) {
	dp := newFakeDatapath()
	dp.panicOnce = true
	r := newRig(t, dp)
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	wantEnrolled(t, dp, "101:198.19.1.1")
}

func TestAgentDefaultMTLSMode(t *testing.T) {
	dp := newFakeDatapath()
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101, netip.MustParseAddr("198.19.1.2"): 102}},
		Store: workload.NewStore(), DefaultMTLS: v1alpha1.MTLSStrict})
	if err != nil {
		t.Fatal(err)
	}
	a.Apply(state(t, map[string]v1alpha1.MTLSMode{"open": v1alpha1.MTLSPermissive},
		pod{"shop/a", "node-1", "198.19.1.1", "", true},
		pod{"open/b", "node-1", "198.19.1.2", "", true}))
	a.reconcile(t.Context(), time.Now())
	if got, want := dp.enrolled(), []string{"101:198.19.1.1:strict", "102:198.19.1.2"}; !slices.Equal(got, want) {
		t.Fatalf("enrolled = %v, want %v (default STRICT, namespace open PERMISSIVE)", got, want)
	}
}

func TestAgentMTLSModePerWorkload(t *testing.T) {
	dp := newFakeDatapath()
	var mu sync.Mutex
	modes := map[string]v1alpha1.MTLSMode{"shop/a": v1alpha1.MTLSStrict, "shop/b": v1alpha1.MTLSUnset}
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101, netip.MustParseAddr("198.19.1.2"): 102}},
		Store: workload.NewStore(), DefaultMTLS: v1alpha1.MTLSPermissive,
		MTLSMode: func(w *workload.Workload) v1alpha1.MTLSMode {
			mu.Lock()
			defer mu.Unlock()
			return modes[w.UID]
		}})
	if err != nil {
		t.Fatal(err)
	}
	st := state(t, map[string]v1alpha1.MTLSMode{"shop": v1alpha1.MTLSStrict},
		pod{"shop/a", "node-1", "198.19.1.1", "", true},
		pod{"shop/b", "node-1", "198.19.1.2", "", true})
	a.Apply(st)
	a.reconcile(t.Context(), time.Now())
	if got, want := dp.enrolled(), []string{"101:198.19.1.1:strict", "102:198.19.1.2:strict"}; !slices.Equal(got, want) {
		t.Fatalf("enrolled = %v, want %v (a from the hook, b from the namespace)", got, want)
	}
	// The policy engine turns a PERMISSIVE: the next pass re-enrolls it.
	mu.Lock()
	modes["shop/a"] = v1alpha1.MTLSPermissive
	mu.Unlock()
	a.Apply(st)
	a.reconcile(t.Context(), time.Now())
	if got, want := dp.enrolled(), []string{"101:198.19.1.1", "102:198.19.1.2:strict"}; !slices.Equal(got, want) {
		t.Fatalf("enrolled = %v, want %v", got, want)
	}
}

func TestReadinessProbe(t *testing.T) {
	dp := newFakeDatapath()
	dp.ready = false
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101}}, Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	probe := func() (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + ReadyPath)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	for _, step := range []struct {
		name    string
		do      func()
		code    int
		reason  string
		settled bool
	}{
		{"before any state", func() {}, 503, "waiting for the first workload snapshot", false},
		{"state applied, programs not attached", func() {
			a.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
			a.reconcile(t.Context(), time.Now())
		}, 503, "not ready: sk_lookup program not attached; no outbound listener (:15001) in the SOCKMAP; no hbone listener (:15008) in the SOCKMAP", false},
		{"attached with listeners", func() {
			dp.mu.Lock()
			dp.ready = true
			dp.mu.Unlock()
		}, 200, "ready: 1 local pods enrolled, 0 pending, 1 veths attached", true},
		{"a new pod whose veth is not there yet", func() {
			a.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}, pod{"shop/b", "node-1", "198.19.1.2", "", true}))
			a.reconcile(t.Context(), time.Now())
		}, 200, "ready: 1 local pods enrolled, 1 pending, 1 veths attached", false},
		{"draining", a.Drain, 503, "shutting down", false},
	} {
		step.do()
		if code, reason := probe(); code != step.code || reason != step.reason {
			t.Errorf("%s: probe = %d %q, want %d %q", step.name, code, reason, step.code, step.reason)
		}
		if got := a.Settled(); got != step.settled {
			t.Errorf("%s: Settled() = %v, want %v", step.name, got, step.settled)
		}
	}
}

func TestReadinessDoesNotWaitForAReconcilePass(t *testing.T) {
	dp := newFakeDatapath()
	dp.block, dp.blocked = make(chan struct{}), make(chan struct{}, 1)
	var unblock sync.Once
	release := func() { unblock.Do(func() { close(dp.block) }) }
	r := newRig(t, dp)
	t.Cleanup(release) // runs before the rig's: the loop can stop
	r.agent.Apply(state(t, nil, pod{"shop/a", "node-1", "198.19.1.1", "", true}))
	<-dp.blocked // the pass is now stuck in EnrollPod
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 3 {
			if ok, reason := r.agent.Ready(); ok || reason != "waiting for the first workload snapshot" {
				t.Errorf("Ready() = %v %q during the first pass", ok, reason)
			}
			if r.agent.Settled() {
				t.Error("Settled() during the first pass")
			}
			r.agent.Pods()
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Ready blocked while a reconcile pass was stuck in the data path")
	}
	release()
	wantEnrolled(t, dp, "101:198.19.1.1")
	eventually(t, "the probe sees the enrolled pod", func() bool {
		ok, reason := r.agent.Ready()
		return ok && reason == "ready: 1 local pods enrolled, 0 pending, 1 veths attached"
	})
	if !r.agent.Settled() {
		t.Error("Settled() = false with the agent ready and its one pod enrolled")
	}
}

// TestAgentSignalsAChangeOfItsPods: a pass that enrolls or un-enrolls a
// pod signals Changed (the Meshed condition is written then, not at the
// next period); a pass that changes nothing does not.
func TestAgentSignalsAChangeOfItsPods(t *testing.T) {
	dp := newFakeDatapath()
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: &fakeLinks{veths: map[netip.Addr]int{netip.MustParseAddr("198.19.1.1"): 101}},
		Store: workload.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	changed := func() bool {
		select {
		case <-a.Changed():
			return true
		default:
			return false
		}
	}
	steps := []struct {
		what string
		pods []pod
		want bool
	}{
		{"a pod enrolled", []pod{{"shop/a", "node-1", "198.19.1.1", "", true}}, true},
		{"the same state again", []pod{{"shop/a", "node-1", "198.19.1.1", "", true}}, false},
		{"the pod gone", nil, true},
		{"still gone", nil, false},
	}
	for _, s := range steps {
		a.Apply(state(t, nil, s.pods...))
		a.reconcile(t.Context(), time.Now())
		if got := changed(); got != s.want {
			t.Errorf("%s: Changed signalled %v, want %v (pods %v)", s.what, got, s.want, a.Pods())
		}
	}
}

// benchIdleResync measures what an agent with pods enrolled pods does
// when nothing changes: the pass of every Config.Resync. Its garbage sits
// in an idle agent's heap between collections.
func benchIdleResync(b *testing.B, links LinkFinder, pods int) {
	dp := newFakeDatapath()
	a, err := New(Config{Node: "node-1", Datapath: dp, Links: links, Resync: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	var ps []pod
	for i := 1; i <= pods; i++ {
		ps = append(ps, pod{fmt.Sprintf("shop/p%d", i), "node-1", fmt.Sprintf("198.19.1.%d", i), "", true})
	}
	a.Apply(state(b, nil, ps...))
	now := time.Now()
	a.reconcile(b.Context(), now)
	if got := pending(a.Pods()); got != 0 {
		b.Fatalf("%d pods not enrolled: %+v", got, a.Pods())
	}
	calls := len(dp.callLog())
	b.ReportAllocs()
	for b.Loop() {
		now = now.Add(time.Minute)
		a.reconcile(b.Context(), now)
	}
	if got := pending(a.Pods()); got != 0 || len(dp.callLog()) != calls {
		b.Fatalf("%d pods not enrolled, data path calls %v", got, dp.callLog()[calls:])
	}
}

// BenchmarkAgentIdleResync is the idle pass over fake veths, which cost
// nothing to find: what the agent itself does.
func BenchmarkAgentIdleResync(b *testing.B) {
	links := &fakeLinks{veths: map[netip.Addr]int{}, fail: map[netip.Addr]int{}}
	for n := 1; n <= 10; n++ {
		links.set(fmt.Sprintf("198.19.1.%d", n), 100+n)
	}
	benchIdleResync(b, links, 10)
}
