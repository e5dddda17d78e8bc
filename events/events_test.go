package events

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 25, 21, 30, 0, 123_000_000, time.UTC)

func TestEventJSON(t *testing.T) {
	for _, tc := range []struct {
		name string
		e    Event
		want string
	}{
		{"a deny names policy, rule and both ends", Event{
			Time: t0, Verdict: Deny, Stage: StageConnect, Reason: "denied-by-policy", Flag: "policy_denied",
			PolicyNamespace: "shop", PolicyName: "payments-deny", Rule: 2, Node: "node-b", Direction: "inbound", MTLS: true,
			SrcID: "spiffe://cluster.local/ns/shop/sa/frontend", Src: netip.MustParseAddrPort("198.19.1.2:40312"),
			SrcWorkload: "frontend-0", SrcNamespace: "shop",
			DstID: "spiffe://cluster.local/ns/shop/sa/payments", Dst: netip.MustParseAddrPort("198.19.2.3:8443"),
			DstWorkload: "payments-0", DstNamespace: "shop",
		}, `{"time":"2026-11-25T21:30:00.123Z","kind":"security_event","verdict":"deny","stage":"connect",` +
			`"reason":"denied-by-policy","flag":"policy_denied","policy":{"namespace":"shop","name":"payments-deny","rule":2},` +
			`"node":"node-b","direction":"inbound","mtls":true,` +
			`"source":{"identity":"spiffe://cluster.local/ns/shop/sa/frontend","ip":"198.19.1.2","port":40312,"workload":"frontend-0","namespace":"shop"},` +
			`"destination":{"identity":"spiffe://cluster.local/ns/shop/sa/payments","ip":"198.19.2.3","port":8443,"workload":"payments-0","namespace":"shop"}}`},
		{"a default deny of a plaintext source has no policy and no identity", Event{
			Time: t0, Verdict: Deny, Stage: StageConnect, Reason: "denied-by-default-deny", Flag: "denied_default", Rule: -1,
			Direction: "inbound_plaintext", Src: netip.MustParseAddrPort("[fd00::1]:5"), Dst: netip.MustParseAddrPort("10.0.0.1:80"),
		}, `{"time":"2026-11-25T21:30:00.123Z","kind":"security_event","verdict":"deny","stage":"connect",` +
			`"reason":"denied-by-default-deny","flag":"denied_default","direction":"inbound_plaintext","mtls":false,` +
			`"source":{"ip":"fd00::1","port":5},"destination":{"ip":"10.0.0.1","port":80}}`},
		{"strings that need escaping are escaped", Event{
			Time: t0, Verdict: Audit, Reason: "allowed-by-default", PolicyNamespace: "a\"b", PolicyName: "n\\m\n", SrcWorkload: "é",
		}, `{"time":"2026-11-25T21:30:00.123Z","kind":"security_event","verdict":"audit","reason":"allowed-by-default",` +
			`"policy":{"namespace":"a\"b","name":"n\\m\n","rule":0},"mtls":false,"source":{"workload":"é"},"destination":{}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(tc.e.Append(nil))
			if got != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", got, tc.want)
			}
			var v map[string]any
			if err := json.Unmarshal([]byte(got), &v); err != nil {
				t.Fatalf("not JSON: %v", err)
			}
		})
	}
}

// syncBuf is a bytes.Buffer safe for a writer and a reader goroutine.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func lines(t *testing.T, s string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for l := range strings.Lines(s) {
		var v map[string]any
		if err := json.Unmarshal([]byte(l), &v); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		out = append(out, v)
	}
	return out
}

func TestWriterWritesPromptly(t *testing.T) {
	var buf syncBuf
	w := NewWriter(&buf, WriterOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	w.Emit(&Event{Time: t0, Verdict: Deny, Reason: "denied-by-policy"})
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(buf.String(), "denied-by-policy") {
		if time.Now().After(deadline) {
			t.Fatal("event not written within 2s while the writer was idle")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWriterSuppressesAFloodAndSaysHowMany(t *testing.T) {
	var buf syncBuf
	now := t0
	w := NewWriter(&buf, WriterOptions{Rate: 10, Burst: 10, Now: func() time.Time { return now }})
	for range 100 {
		w.Emit(&Event{Time: t0, Verdict: Deny, Reason: "rate-limited"})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := w.Run(ctx); err != nil {
		t.Fatal(err)
	}
	ls := lines(t, buf.String())
	if len(ls) != 11 {
		t.Fatalf("%d lines, want 10 events and a summary:\n%s", len(ls), buf.String())
	}
	want := map[string]any{"time": "2026-11-25T21:30:00.123Z", "kind": "events_suppressed", "suppressed": 90.0, "since": "2026-11-25T21:30:00.123Z"}
	if !reflect.DeepEqual(ls[10], want) {
		t.Fatalf("summary %v, want %v", ls[10], want)
	}
	if st := w.Stats(); st != (Stats{Written: 10, Suppressed: 90}) {
		t.Fatalf("stats %+v", st)
	}
}

func TestEmitNeverBlocksWhenNothingWrites(t *testing.T) {
	w := NewWriter(&syncBuf{}, WriterOptions{QueueSize: 4, Rate: 1e9})
	done := make(chan struct{})
	go func() {
		for range 10000 {
			w.Emit(&Event{Verdict: Deny})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Emit blocked with a full queue")
	}
	if st := w.Stats(); st.Suppressed != 10000-4 {
		t.Fatalf("suppressed %d, want %d", st.Suppressed, 10000-4)
	}
}

func TestEmitDoesNotAllocate(t *testing.T) {
	w := NewWriter(&syncBuf{}, WriterOptions{QueueSize: 1, Rate: 1e9})
	e := &Event{Time: t0, Verdict: Deny, SrcID: "spiffe://cluster.local/ns/a/sa/b", Src: netip.MustParseAddrPort("10.0.0.1:1")}
	if n := testing.AllocsPerRun(1000, func() { w.Emit(e) }); n != 0 {
		t.Fatalf("Emit allocates %v times", n)
	}
}
