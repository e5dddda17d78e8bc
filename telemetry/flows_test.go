package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/ztunnel"
)

func TestNewFlowDescribesTheFlow(t *testing.T) {
	r := hboneOut(9)
	r.Verdict = ztunnel.Verdict{Policy: "shop/deny-frontend", Rule: 2, Reason: "denied-by-policy"}
	r.Flag, r.Err = ztunnel.FlagPolicyDenied, errors.New(`ztunnel: denied by policy "shop/deny-frontend"`)
	r.Duration = 1500 * time.Microsecond
	f := NewFlow(r, events.Close, time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	got, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"v":1,"time":"2026-11-25T12:00:00Z","kind":"flow","event":"close","id":9,"direction":"outbound","path":"hbone","mtls":true,` +
		`"src":{"addr":"198.19.1.10:40000","workload":"frontend-7d9f-abcde","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/frontend"},` +
		`"dst":{"addr":"198.19.2.10:8443","workload":"payments-0","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/payments","service":"payments.shop.svc.cluster.local"},` +
		`"bytes_sent":0,"bytes_received":0,"duration_ms":1.5,"response_flag":"policy_denied",` +
		`"verdict":"denied","reason":"denied-by-policy","policy":"shop/deny-frontend","rule":2,"error":"ztunnel: denied by policy \"shop/deny-frontend\""}`
	if string(got) != want {
		t.Errorf("flow =\n%s\nwant\n%s", got, want)
	}
}

func TestNewFlowOfACutFlowNamesThePolicyThatCutIt(t *testing.T) {
	r := hboneOut(7)
	r.Direction = ztunnel.Inbound
	r.Admitted = ztunnel.Verdict{Allow: true, Reason: "allowed-by-default"}
	r.Verdict = ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Policy: "shop/deny-8080", Rule: 0, Reason: "denied-by-policy"}
	r.Flag, r.Sent, r.Received = ztunnel.FlagPolicyDenied, 5, 5
	f := NewFlow(r, events.Close, time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	if f.Verdict != events.Denied || f.Reason != "denied-by-policy" || f.Policy != "shop/deny-8080" || f.Rule != 0 ||
		f.ResponseFlag != "policy_denied" || f.BytesSent != 5 {
		t.Errorf("flow %+v; want denied by rule 0 of shop/deny-8080 with its 5 bytes", f)
	}
	if !(FlowFilter{Verdict: events.Denied}).Match(&f) {
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
		{"allowed and ran", ztunnel.Verdict{Allow: true}, ztunnel.FlagNone, events.Allowed},
		{"allowed, then the destination refused", ztunnel.Verdict{Allow: true}, ztunnel.FlagConnectFailed, events.Allowed},
		{"denied by policy", ztunnel.Verdict{}, ztunnel.FlagPolicyDenied, events.Denied},
		{"denied with a flag of its own", ztunnel.Verdict{Flag: ztunnel.FlagStrictPlaintext}, ztunnel.FlagStrictPlaintext, events.Denied},
		{"refused before policy was asked", ztunnel.Verdict{}, ztunnel.FlagUnknownSource, ""},
		{"admitted, then cut by a policy change", ztunnel.Verdict{Flag: ztunnel.FlagPolicyDenied, Reason: "denied-by-policy"}, ztunnel.FlagPolicyDenied, events.Denied},
		{"pre-checked, then refused by the destination (401)", ztunnel.Verdict{Flag: ztunnel.FlagHBONERefused, Reason: ztunnel.ReasonDeniedByDestination}, ztunnel.FlagHBONERefused, events.Denied},
		{"pre-checked, then the destination could not connect (503)", ztunnel.Verdict{Allow: true}, ztunnel.FlagHBONERefused, events.Allowed},
	} {
		r := hboneOut(0)
		r.Verdict, r.Flag = c.verdict, c.flag
		if got, _ := verdictOf(r); got != c.want {
			t.Errorf("%s: verdict %q, want %q", c.name, got, c.want)
		}
	}
}

func event(i int, ns, verdict string) events.Flow {
	return events.Flow{Kind: events.KindFlow, Event: events.Close, ID: uint64(i), Src: events.Endpoint{Namespace: ns, Workload: fmt.Sprintf("w%d", i)}, Verdict: verdict}
}

func ids(evs []events.Flow) []uint64 {
	var out []uint64
	for _, e := range evs {
		out = append(out, e.ID)
	}
	return out
}

func TestFlowLogKeepsTheNewestAndFilters(t *testing.T) {
	l := NewFlowLog(4)
	for i := 1; i <= 6; i++ {
		v := events.Allowed
		if i%2 == 0 {
			v = events.Denied
		}
		l.Add(event(i, "shop", v))
	}
	l.Add(event(7, "web", events.Denied))
	for _, c := range []struct {
		name  string
		f     FlowFilter
		limit int
		want  string
	}{
		{"all, oldest first", FlowFilter{}, 0, "[4 5 6 7]"},
		{"limit keeps the newest", FlowFilter{}, 2, "[6 7]"},
		{"denied", FlowFilter{Verdict: events.Denied}, 0, "[4 6 7]"},
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

// TestFlowLogGrowsToItsSizeThenKeepsTheNewest: the ring holds only what
// came (it grows as events come), in order while it grows, and the newest
// size events, in order, once it wrapped.
func TestFlowLogGrowsToItsSizeThenKeepsTheNewest(t *testing.T) {
	const size = 50
	l := NewFlowLog(size)
	if got := l.Recent(FlowFilter{}, 0); len(got) != 0 {
		t.Fatalf("an empty log holds %d events", len(got))
	}
	want := func(from, to int) string {
		var w []int
		for i := from; i <= to; i++ {
			w = append(w, i)
		}
		return fmt.Sprint(w)
	}
	for i := 1; i <= 120; i++ {
		l.Add(event(i, "shop", events.Allowed))
		if i == 37 || i == size || i == size+1 || i == 120 {
			if got := fmt.Sprint(ids(l.Recent(FlowFilter{}, 0))); got != want(max(1, i-size+1), i) {
				t.Fatalf("after %d events: %s, want %s", i, got, want(max(1, i-size+1), i))
			}
		}
	}
	if c := cap(l.ring); c != size {
		t.Errorf("the ring's capacity is %d, want its size %d", c, size)
	}
}

func TestFlowLogFollowersNeverBlockTheWriter(t *testing.T) {
	l := NewFlowLog(8)
	slow, err := l.Follow(FlowFilter{Verdict: events.Denied}, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	for i := 1; i <= 10; i++ {
		l.Add(event(i, "shop", events.Denied)) // nobody reads: must not block
	}
	l.Add(event(11, "shop", events.Allowed)) // filtered out, not lost
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

func TestAccessLogWritesOneJSONLinePerFlow(t *testing.T) {
	var buf bytes.Buffer
	a := events.NewWriter(&buf, events.WriterOptions{Node: "node-a"})
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	o := NewObserver(ObserverOptions{AccessLog: a, Flows: NewFlowLog(16), Now: func() time.Time { return now }})
	r := hboneOut(3)
	r.Sent, r.Received = 11, 22
	o.FlowEnded(r)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	a.Run(ctx)
	want := NewFlow(r, events.Close, now)
	want.Node = "node-a"
	if got := buf.String(); got != string(want.Append(nil))+"\n" {
		t.Errorf("access log:\n%s\nwant the flow's line:\n%s", got, want.Append(nil))
	}
	if want.BytesSent != 11 || want.Verdict != events.Allowed || want.Src.Identity != id(frontend).String() {
		t.Errorf("line = %+v", want)
	}
}
