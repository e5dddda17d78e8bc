package events

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

var t0 = time.Date(2026, 11, 25, 21, 30, 0, 123_000_000, time.UTC)

func TestFlowJSON(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    Flow
		want string
	}{
		{"an access log line has every field of the flow", Flow{
			Time: t0, Kind: KindFlow, Event: Close, Node: "node1", ID: 7, Direction: "outbound", Path: "hbone", MTLS: true,
			Src: Endpoint{Addr: netip.MustParseAddrPort("198.19.1.2:40312"), Workload: "client", Namespace: "shop",
				Identity: "spiffe://cluster.local/ns/shop/sa/client"},
			Dst: Endpoint{Addr: netip.MustParseAddrPort("198.19.2.2:8080"), Workload: "server", Namespace: "shop",
				Identity: "spiffe://cluster.local/ns/shop/sa/server", Service: "server.shop.svc.cluster.local"},
			BytesSent: 1048579, BytesReceived: 17, DurationMS: 41.25, ResponseFlag: "policy_denied",
			Verdict: Denied, Reason: "denied-by-policy", Policy: "shop/server-deny", Rule: 2, Error: "ztunnel: denied",
		}, `{"v":1,"time":"2026-11-25T21:30:00.123Z","kind":"flow","event":"close","node":"node1","id":7,` +
			`"direction":"outbound","path":"hbone","mtls":true,` +
			`"src":{"addr":"198.19.1.2:40312","workload":"client","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/client"},` +
			`"dst":{"addr":"198.19.2.2:8080","workload":"server","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/server","service":"server.shop.svc.cluster.local"},` +
			`"bytes_sent":1048579,"bytes_received":17,"duration_ms":41.25,"response_flag":"policy_denied",` +
			`"verdict":"denied","reason":"denied-by-policy","policy":"shop/server-deny","rule":2,"error":"ztunnel: denied"}`},
		{"a STRICT refusal of a plaintext source names the policy without a rule", Flow{
			Time: t0, Kind: KindSecurityEvent, Event: Deny, Stage: StageConnect, Direction: "inbound_plaintext",
			Src:          Endpoint{Addr: netip.MustParseAddrPort("[fd00::1]:5"), Workload: "legacy", Namespace: "legacy"},
			Dst:          Endpoint{Addr: netip.MustParseAddrPort("10.0.0.1:80"), Identity: "spiffe://cluster.local/ns/shop/sa/server"},
			ResponseFlag: "strict_plaintext", Verdict: Denied, Reason: "denied-plaintext-strict", Policy: "shop/server-strict", Rule: -1,
		}, `{"v":1,"time":"2026-11-25T21:30:00.123Z","kind":"security_event","event":"deny","stage":"connect",` +
			`"direction":"inbound_plaintext","mtls":false,"src":{"addr":"[fd00::1]:5","workload":"legacy","namespace":"legacy"},` +
			`"dst":{"addr":"10.0.0.1:80","identity":"spiffe://cluster.local/ns/shop/sa/server"},` +
			`"bytes_sent":0,"bytes_received":0,"duration_ms":0,"response_flag":"strict_plaintext",` +
			`"verdict":"denied","reason":"denied-plaintext-strict","policy":"shop/server-strict","rule":-1}`},
		{"an AUDIT hit names the AUDIT policy besides the deciding one", Flow{
			Time: t0, Kind: KindSecurityEvent, Event: Audit, Stage: StageConnect, Direction: "inbound", MTLS: true,
			ResponseFlag: "-", Verdict: Allowed, Reason: "allowed-by-default", AuditPolicy: "shop/audit", AuditRule: 0,
		}, `{"v":1,"time":"2026-11-25T21:30:00.123Z","kind":"security_event","event":"audit","stage":"connect",` +
			`"direction":"inbound","mtls":true,"src":{},"dst":{},"bytes_sent":0,"bytes_received":0,"duration_ms":0,"response_flag":"-",` +
			`"verdict":"allowed","reason":"allowed-by-default","audit_policy":"shop/audit","audit_rule":0}`},
		{"strings that need escaping are escaped", Flow{
			Time: t0, Kind: KindFlow, Event: Open, Src: Endpoint{Workload: "é\"\\\n"}, Dst: Endpoint{Namespace: "ns"}, Policy: "a/b", Rule: 1,
		}, `{"v":1,"time":"2026-11-25T21:30:00.123Z","kind":"flow","event":"open","direction":"","mtls":false,` +
			`"src":{"workload":"é\"\\\n"},"dst":{"namespace":"ns"},"bytes_sent":0,"bytes_received":0,"duration_ms":0,"response_flag":"",` +
			`"policy":"a/b","rule":1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := json.Marshal(tc.f)
			if err != nil || string(got) != tc.want {
				t.Fatalf("got (%v)\n%s\nwant\n%s", err, got, tc.want)
			}
			var back Flow
			if err := json.Unmarshal(got, &back); err != nil {
				t.Fatalf("does not decode: %v", err)
			}
			if back != tc.f {
				t.Fatalf("decodes to\n%+v\nwant\n%+v", back, tc.f)
			}
		})
	}
}

// FuzzFlowJSON: whatever the strings (names come from the cluster), a line
// is one valid JSON object that decodes back to the flow.
func FuzzFlowJSON(f *testing.F) {
	f.Add("shop", "client-0", "spiffe://cluster.local/ns/shop/sa/client", "shop/deny", "ztunnel: \"x\"\n", -1, 41.25)
	f.Add("", "é\u2028<&>", "\x00\x1f\\", "", "", 0, 0.000001)
	f.Fuzz(func(t *testing.T, ns, workload, identity, policy, errText string, rule int, ms float64) {
		for _, s := range []string{ns, workload, identity, policy, errText} {
			if !utf8.ValidString(s) {
				t.Skip("invalid UTF-8 is replaced by U+FFFD")
			}
		}
		if math.IsNaN(ms) || math.IsInf(ms, 0) {
			t.Skip("no such duration")
		}
		in := Flow{Time: t0, Kind: KindFlow, Event: Close, Node: ns, Direction: "outbound",
			Src: Endpoint{Workload: workload, Namespace: ns, Identity: identity}, Dst: Endpoint{Service: workload},
			DurationMS: ms, ResponseFlag: "-", Verdict: Denied, Reason: policy, Policy: policy, Error: errText}
		if policy != "" {
			in.Rule = rule
		}
		line := in.Append(nil)
		if bytes.ContainsAny(line, "\n\r") {
			t.Fatalf("line breaks in %s", line)
		}
		var out Flow
		if err := json.Unmarshal(line, &out); err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		if out != in {
			t.Fatalf("%s decodes to\n%+v\nwant\n%+v", line, out, in)
		}
	})
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

// run runs w until the test ends (or the returned stop is called).
func run(t *testing.T, w *Writer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		w.Run(ctx)
		close(done)
	}()
	stop = func() {
		cancel()
		<-done
	}
	t.Cleanup(stop)
	return stop
}

// waitFor polls cond for up to 10s (the machine may be loaded).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
	}
}

func TestWriterWritesPromptly(t *testing.T) {
	var buf syncBuf
	w := NewWriter(&buf, WriterOptions{})
	run(t, w)
	w.Emit(&Flow{Time: t0, Kind: KindSecurityEvent, Event: Deny, Reason: "denied-by-policy"})
	waitFor(t, "an event written while the writer was idle", func() bool { return strings.Contains(buf.String(), "denied-by-policy") })
}

func TestWriterSuppressesAFloodAndSaysHowMany(t *testing.T) {
	var buf syncBuf
	w := NewWriter(&buf, WriterOptions{Name: "security_events", Node: "node-b", Rate: 10, Burst: 10, QueueSize: 6,
		Now: func() time.Time { return t0 }})
	for range 100 {
		w.Emit(&Flow{Time: t0, Kind: KindSecurityEvent, Event: Deny, Reason: "rate-limited"})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	w.Run(ctx)
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 7 {
		t.Fatalf("%d lines, want 6 events and a summary:\n%s", len(lines), buf.String())
	}
	if !strings.Contains(lines[0], `"node":"node-b"`) {
		t.Errorf("line without the node: %s", lines[0])
	}
	want := `{"v":1,"time":"2026-11-25T21:30:00.123Z","kind":"suppressed","node":"node-b","stream":"security_events",` +
		`"suppressed":94,"rate_limited":90,"queue_full":4,"since":"2026-11-25T21:30:00.123Z"}`
	if lines[6] != want {
		t.Fatalf("summary\n%s\nwant\n%s", lines[6], want)
	}
	if st := w.Stats(); st != (Stats{Written: 6, RateLimited: 90, QueueFull: 4}) {
		t.Fatalf("stats %+v", st)
	}
}

func TestWriterSummarisesWhileRunning(t *testing.T) {
	var buf syncBuf
	w := NewWriter(&buf, WriterOptions{Rate: 1, Burst: 1, SummaryInterval: 10 * time.Millisecond})
	for range 3 { // before Run, so that one interval holds both suppressions
		w.Emit(&Flow{Kind: KindFlow, Event: Close})
	}
	run(t, w)
	waitFor(t, "a summary of 2 lines", func() bool { return strings.Contains(buf.String(), `"suppressed":2,"rate_limited":2,"queue_full":0`) })
	time.Sleep(50 * time.Millisecond) // several intervals that lost nothing
	if n := strings.Count(buf.String(), `"kind":"suppressed"`); n != 1 {
		t.Fatalf("%d summaries, want 1:\n%s", n, buf.String())
	}
}

// blockingWriter blocks every write until released.
type blockingWriter struct {
	release chan struct{}
	syncBuf
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	return w.syncBuf.Write(p)
}

func TestEmitNeverBlocksWhenTheOutputIsStuck(t *testing.T) {
	out := &blockingWriter{release: make(chan struct{})}
	w := NewWriter(out, WriterOptions{Rate: 1e9, QueueSize: 3, SummaryInterval: time.Hour})
	stop := run(t, w)
	done := make(chan struct{})
	go func() {
		for range 1000 {
			w.Emit(&Flow{Kind: KindFlow, Event: Close})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Emit blocked with a stuck output")
	}
	close(out.release)
	stop()
	// The queue, and at most the line the writer held, were kept.
	st := w.Stats()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if st.QueueFull < 1000-4 || st.Written+st.QueueFull != 1000 || uint64(len(lines)) != st.Written+1 {
		t.Fatalf("stats %+v and %d lines: want every line written or counted, and a summary", st, len(lines))
	}
	var sum struct {
		Kind       string
		Suppressed uint64
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &sum); err != nil || sum.Kind != KindSuppressed || sum.Suppressed != st.QueueFull {
		t.Fatalf("last line %s: want a summary of %d lines (%v)", lines[len(lines)-1], st.QueueFull, err)
	}
}

// failingWriter fails its first n writes.
type failingWriter struct {
	n int
	syncBuf
}

func (w *failingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.n > 0 {
		w.n--
		w.mu.Unlock()
		return 0, errors.New("disk full")
	}
	w.mu.Unlock()
	return w.syncBuf.Write(p)
}

func TestFailedWritesAreCountedLoggedAndWritingGoesOn(t *testing.T) {
	out := &failingWriter{n: 3}
	var logs syncBuf
	w := NewWriter(out, WriterOptions{Name: "access_log", SummaryInterval: time.Hour, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	stop := run(t, w)
	for i := range 5 {
		w.Emit(&Flow{Kind: KindFlow, Event: Close, ID: uint64(i + 1)})
	}
	waitFor(t, "the lines after the failures", func() bool { return w.Stats().Written == 2 })
	stop()
	if st := w.Stats(); st != (Stats{Written: 2, Failed: 3}) {
		t.Errorf("stats %+v", st)
	}
	if !strings.Contains(out.String(), `"id":5`) {
		t.Errorf("output %s: want the lines after the failures", out.String())
	}
	if l := logs.String(); strings.Count(l, "\n") != 1 || !strings.Contains(l, `msg="events: write failed; lines lost" stream=access_log lines=3 error="disk full"`) {
		t.Errorf("log:\n%s\nwant one line counting 3 lost lines", l)
	}
}

func TestEmitDoesNotAllocate(t *testing.T) {
	w := NewWriter(&syncBuf{}, WriterOptions{QueueSize: 1, Rate: 1e9})
	f := &Flow{Time: t0, Kind: KindSecurityEvent, Event: Deny, Src: Endpoint{Identity: "spiffe://cluster.local/ns/a/sa/b", Addr: netip.MustParseAddrPort("10.0.0.1:1")}}
	if n := testing.AllocsPerRun(1000, func() { w.Emit(f) }); n != 0 {
		t.Fatalf("Emit allocates %v times", n)
	}
}

func TestCollectorCountsEveryResult(t *testing.T) {
	w := NewWriter(&failingWriter{n: 1}, WriterOptions{Rate: 3, Burst: 3, QueueSize: 2, Now: func() time.Time { return t0 }})
	for range 4 {
		w.Emit(&Flow{})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	w.Run(ctx)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(w, "mantlet_test_lines_total", "Lines."))
	want := `
# HELP mantlet_test_lines_total Lines.
# TYPE mantlet_test_lines_total counter
mantlet_test_lines_total{result="failed"} 1
mantlet_test_lines_total{result="queue_full"} 1
mantlet_test_lines_total{result="rate_limited"} 1
mantlet_test_lines_total{result="written"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}
