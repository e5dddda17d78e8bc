package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel"
)

func TestFlowEventDescribesTheFlow(t *testing.T) {
	r := hboneOut(9)
	r.Verdict = ztunnel.Verdict{Policy: "shop/deny-frontend", Rule: 2, Reason: "denied-by-policy"}
	r.Flag, r.Err = ztunnel.FlagPolicyDenied, errors.New(`ztunnel: denied by policy "shop/deny-frontend"`)
	r.Duration = 1500 * time.Microsecond
	ev := NewFlowEvent(r, EventClose, time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	got, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"time":"2026-11-25T12:00:00Z","event":"close","id":9,"direction":"outbound","path":"hbone",` +
		`"src":{"addr":"198.19.1.10:40000","workload":"frontend-7d9f-abcde","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/frontend"},` +
		`"dst":{"addr":"198.19.2.10:8443","workload":"payments-0","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/payments","service":"payments.shop.svc.cluster.local"},` +
		`"hbone_addr":"198.19.2.10:8443","mtls":true,"bytes_sent":0,"bytes_received":0,"duration_ms":1.5,"response_flag":"policy_denied",` +
		`"verdict":"denied","reason":"denied-by-policy","policy":"shop/deny-frontend","rule":2,"error":"ztunnel: denied by policy \"shop/deny-frontend\""}`
	if string(got) != want {
		t.Errorf("event =\n%s\nwant\n%s", got, want)
	}
}

func TestFlowEventOfACutFlowNamesThePolicyThatCutIt(t *testing.T) {
	r := hboneOut(7)
	r.Direction = ztunnel.Inbound
	r.Admitted = ztunnel.Verdict{Allow: true, Reason: "allowed-by-default"}
	r.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Policy: "shop/deny-8080", Rule: 0, Reason: "denied-by-policy"}
	r.Flag, r.Sent, r.Received = ztunnel.FlagPolicyDenied, 5, 5
	ev := NewFlowEvent(r, EventClose, time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	if ev.Verdict != VerdictDenied || ev.Reason != "denied-by-policy" || ev.Policy != "shop/deny-8080" || ev.Rule == nil || *ev.Rule != 0 ||
		ev.ResponseFlag != "policy_denied" || ev.BytesSent != 5 {
		t.Errorf("event %+v; want denied by rule 0 of shop/deny-8080 with its 5 bytes", ev)
	}
	if !(FlowFilter{Verdict: VerdictDenied}).Match(&ev) {
		t.Error("--verdict denied does not match the cut flow")
	}
}

func TestVerdictOfTellsDenialsFromFlowsNeverAsked(t *testing.T) {
	for _, c := range []struct {
		name    string
		verdict ztunnel.Verdict
		flag    ztunnel.ResponseFlag
		want    string
	}{
		{"allowed and ran", ztunnel.Verdict{Allow: true}, ztunnel.FlagNone, VerdictAllowed},
		{"allowed, then the destination refused", ztunnel.Verdict{Allow: true}, ztunnel.FlagConnectFailed, VerdictAllowed},
		{"denied by policy", ztunnel.Verdict{}, ztunnel.FlagPolicyDenied, VerdictDenied},
		{"denied with a flag of its own", ztunnel.Verdict{Flag: ztunnel.FlagStrictPlaintext}, ztunnel.FlagStrictPlaintext, VerdictDenied},
		{"refused before policy was asked", ztunnel.Verdict{}, ztunnel.FlagUnknownSource, ""},
		{"admitted, then cut by a policy change", ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Reason: "denied-by-policy"}, ztunnel.FlagPolicyDenied, VerdictDenied},
		{"pre-checked, then refused by the destination (401)", ztunnel.Verdict{Flag: ztunnel.FlagHBONERefused, Reason: ztunnel.ReasonDeniedByDestination}, ztunnel.FlagHBONERefused, VerdictDenied},
		{"pre-checked, then the destination could not connect (503)", ztunnel.Verdict{Allow: true}, ztunnel.FlagHBONERefused, VerdictAllowed},
	} {
		r := hboneOut(0)
		r.Verdict, r.Flag = c.verdict, c.flag
		if got, _ := verdictOf(r); got != c.want {
			t.Errorf("%s: verdict %q, want %q", c.name, got, c.want)
		}
	}
}

func event(i int, ns, verdict string) FlowEvent {
	return FlowEvent{Event: EventClose, ID: uint64(i), Src: Endpoint{Namespace: ns, Workload: fmt.Sprintf("w%d", i)}, Verdict: verdict}
}

func ids(evs []FlowEvent) []uint64 {
	var out []uint64
	for _, e := range evs {
		out = append(out, e.ID)
	}
	return out
}

func TestFlowLogKeepsTheNewestAndFilters(t *testing.T) {
	l := NewFlowLog(4)
	for i := 1; i <= 6; i++ {
		v := VerdictAllowed
		if i%2 == 0 {
			v = VerdictDenied
		}
		l.Add(event(i, "shop", v))
	}
	l.Add(event(7, "web", VerdictDenied))
	for _, c := range []struct {
		name  string
		f     FlowFilter
		limit int
		want  string
	}{
		{"all, oldest first", FlowFilter{}, 0, "[4 5 6 7]"},
		{"limit keeps the newest", FlowFilter{}, 2, "[6 7]"},
		{"denied", FlowFilter{Verdict: VerdictDenied}, 0, "[4 6 7]"},
		{"namespace", FlowFilter{Namespace: "web"}, 0, "[7]"},
		{"workload by name", FlowFilter{Workload: "w5"}, 0, "[5]"},
		{"workload by namespace/name", FlowFilter{Workload: "shop/w7"}, 0, "[]"},
	} {
		if got := fmt.Sprint(ids(l.Recent(c.f, c.limit))); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
	if l.Total() != 7 {
		t.Errorf("Total = %d, want 7", l.Total())
	}
}

func TestFlowLogFollowersNeverBlockTheWriter(t *testing.T) {
	l := NewFlowLog(8)
	slow, err := l.Follow(FlowFilter{Verdict: VerdictDenied}, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	for i := 1; i <= 10; i++ {
		l.Add(event(i, "shop", VerdictDenied)) // nobody reads: must not block
	}
	l.Add(event(11, "shop", VerdictAllowed)) // filtered out, not lost
	if got := []uint64{(<-slow.C()).ID, (<-slow.C()).ID}; fmt.Sprint(got) != "[1 2]" {
		t.Errorf("follower got %v, want the first two", got)
	}
	if n := slow.Lost(); n != 8 {
		t.Errorf("Lost = %d, want 8", n)
	}
	var fs []*Follower
	for range MaxFollowers - 1 {
		f, err := l.Follow(FlowFilter{}, 1)
		if err != nil {
			t.Fatal(err)
		}
		fs = append(fs, f)
	}
	if _, err := l.Follow(FlowFilter{}, 1); !errors.Is(err, ErrTooManyFollowers) {
		t.Errorf("follower %d: err = %v, want ErrTooManyFollowers", MaxFollowers+1, err)
	}
	fs[0].Close()
	if _, err := l.Follow(FlowFilter{}, 1); err != nil {
		t.Errorf("after a Close: %v", err)
	}
}

// blockingWriter blocks every write until released.
type blockingWriter struct {
	release chan struct{}
	mu      sync.Mutex
	buf     bytes.Buffer
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func TestAccessLogDropsUnderAFloodWithoutBlocking(t *testing.T) {
	w := &blockingWriter{release: make(chan struct{})}
	a := NewAccessLog(w, AccessLogOptions{Rate: 10, Burst: 5, QueueSize: 3, SummaryEvery: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()

	start := time.Now()
	for i := range 1000 {
		a.Log(event(i, "shop", VerdictAllowed))
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("1000 Log calls took %v with a stuck writer: Log blocks", d)
	}
	// At most the burst passes the limiter, and at most the queue (plus the
	// one line the writer holds) is kept of it.
	if got := a.Dropped(); got < 1000-5 {
		t.Errorf("Dropped = %d, want at least %d", got, 1000-5)
	}
	close(w.release)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(w.buf.String()), "\n")
	last := lines[len(lines)-1]
	var sum struct {
		Event   string
		Dropped uint64
		Msg     string
	}
	if err := json.Unmarshal([]byte(last), &sum); err != nil || sum.Event != "dropped" || sum.Dropped != a.Dropped() {
		t.Fatalf("last line %q: want a summary of %d dropped lines (%v)", last, a.Dropped(), err)
	}
	if want := fmt.Sprintf("access log: dropped %d lines", a.Dropped()); !strings.HasPrefix(sum.Msg, want) {
		t.Errorf("summary msg %q, want prefix %q", sum.Msg, want)
	}
	if kept := uint64(len(lines) - 1); kept+a.Dropped() != 1000 {
		t.Errorf("%d lines written + %d dropped != 1000", kept, a.Dropped())
	}
}

func TestAccessLogWritesOneJSONLinePerFlow(t *testing.T) {
	var buf bytes.Buffer
	a := NewAccessLog(&buf, AccessLogOptions{})
	o := NewObserver(ObserverOptions{AccessLog: a, Flows: NewFlowLog(16),
		Now: func() time.Time { return time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC) }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	r := hboneOut(3)
	r.Sent, r.Received = 11, 22
	o.FlowEnded(r)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(&buf)
	var ev FlowEvent
	if err := dec.Decode(&ev); err != nil {
		t.Fatal(err)
	}
	if ev.ID != 3 || ev.BytesSent != 11 || ev.BytesReceived != 22 || ev.Verdict != VerdictAllowed || ev.Src.Identity != id(frontend).String() {
		t.Errorf("line = %+v", ev)
	}
	if err := dec.Decode(&ev); err != io.EOF {
		t.Errorf("more than one line: %v %+v", err, ev)
	}
}
