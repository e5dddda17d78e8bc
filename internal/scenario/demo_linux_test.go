package scenario

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// mantletBinary returns a mantlet executable for the agents of the demo:
// $MANTLET_TEST_BINARY, or one built for the test.
func mantletBinary(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	b, err := meshtest.BinaryOrBuild(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var demoPrefixRE = regexp.MustCompile(`\(testbed (demo[0-9a-f]+)\)`)

// checkDemoLeftNothing fails t if the testbed, pins or temporary files of
// the demo whose report is out survived.
func checkDemoLeftNothing(t *testing.T, out string) {
	t.Helper()
	m := demoPrefixRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("the report names no testbed:\n%s", out)
	}
	prefix := m[1]
	if ns, _ := filepath.Glob("/run/netns/" + prefix + "-*"); len(ns) > 0 {
		t.Errorf("namespaces left behind: %v", ns)
	}
	if pins, _ := filepath.Glob(filepath.Join(bpf.DefaultPinRoot, prefix+"-*")); len(pins) > 0 {
		t.Errorf("pins left behind: %v", pins)
	}
	if logs := regexp.MustCompile(`tail -f (\S+)`).FindStringSubmatch(out); logs != nil {
		if _, err := os.Stat(filepath.Dir(logs[1])); err == nil {
			t.Errorf("temporary directory %s left behind", filepath.Dir(logs[1]))
		}
	}
}

// TestDemoReportsCaptureIdentitiesAndAnEncryptedWire runs the demo and
// checks the lines of its report a user relies on.
func TestDemoReportsCaptureIdentitiesAndAnEncryptedWire(t *testing.T) {
	privtest.Require(t)
	bin := mantletBinary(t)
	var out, errb bytes.Buffer
	start := time.Now()
	err := Demo(context.Background(), bin, DemoOptions{Stdout: &out, Stderr: &errb})
	took := time.Since(start)
	report := out.String()
	if err != nil {
		t.Fatalf("Demo: %v; stdout:\n%s\nstderr:\n%s", err, report, errb.String())
	}
	for _, want := range []string{
		"ok    the meshed server saw the client pod's own IP (peer 198.19.1.11:",
		"ok    the connection was captured on node1 (outbound) and carried over HBONE to node2 (inbound)",
		"ok    identities on both ends: client spiffe://cluster.local/ns/shop/sa/client, server spiffe://cluster.local/ns/shop/sa/server",
		"  node1  outbound hbone  198.19.1.11:",
		"  node2  inbound hbone  198.19.1.11:",
		"ok    Istio's metrics count it on both ends: istio_tcp_connections_opened_total, reporter source on node1 and destination on node2, connection_security_policy mutual_tls",
		"ok    meshed traffic on the wire: ",
		"every one to or from port 15008 (0 on another port)",
		"ok    it is TLS 1.3 from ",
		"to the destination pod 198.19.2.11:15008: client hello with ALPN h2 and no SNI",
		`ok    the meshed marker "mantlet-demo-secret-`,
		`ok    unmeshed traffic left alone: marker "legacy-demo-plaintext-`,
		"198.19.1.12 -> 198.19.2.12:8080 directly",
		"ok    no ztunnel saw it: 0 flows recorded, 0 Istio metric series, capture counters moved by 0",
		"curl -s http://127.0.0.1:15020/metrics",
		`mantlet_datapath_packets_total{event="lookup_outbound"} 1`,
		`mantlet_datapath_packets_total{event="lookup_hbone"} 1`,
		"All checks passed in ",
		"Removed.",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("the report lacks %q", want)
		}
	}
	if strings.Contains(report, "FAIL") {
		t.Error("the report shows a failed check")
	}
	if t.Failed() {
		t.Logf("report:\n%s\nstderr:\n%s", report, errb.String())
	}
	if took > 30*time.Second {
		t.Errorf("the demo took %v; it should take well under 30 s", took)
	}
	checkDemoLeftNothing(t, report)
}

// TestDemoTwiceWhileAnotherToolAddsNamespaces: the demo passes twice in a
// row while another process keeps running `ip netns add` and `ip netns
// del` (whose first mount would cover namespaces made carelessly), and
// each run leaves no namespace, pin, temporary file or routing rule of its
// own behind.
func TestDemoTwiceWhileAnotherToolAddsNamespaces(t *testing.T) {
	privtest.Require(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("iproute2's ip is needed: %v", err)
	}
	bin := mantletBinary(t)
	rulesBefore := rootRules(t)
	stop := make(chan struct{})
	done := make(chan struct{})
	name := fmt.Sprintf("mtdemo-other-%d", os.Getpid())
	added := 0
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			n := fmt.Sprintf("%s-%d", name, i%4)
			if exec.Command("ip", "netns", "add", n).Run() == nil {
				added++
			}
			_ = exec.Command("ip", "netns", "del", n).Run()
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
		for i := range 4 {
			_ = exec.Command("ip", "netns", "del", fmt.Sprintf("%s-%d", name, i)).Run()
		}
	})
	for run := 1; run <= 2; run++ {
		var out, errb bytes.Buffer
		err := Demo(context.Background(), bin, DemoOptions{Stdout: &out, Stderr: &errb})
		if err != nil || strings.Contains(out.String(), "FAIL") || !strings.Contains(out.String(), "All checks passed in ") {
			t.Fatalf("demo run %d: %v; stdout:\n%s\nstderr:\n%s", run, err, out.String(), errb.String())
		}
		checkDemoLeftNothing(t, out.String())
	}
	close(stop)
	<-done
	if added == 0 {
		t.Fatal("the other tool never added a namespace: the test proved nothing")
	}
	if after := rootRules(t); after != rulesBefore {
		t.Errorf("the demo changed the root namespace's routing rules:\nbefore:\n%s\nafter:\n%s", rulesBefore, after)
	}
}

// rootRules lists the routing rules of the test's own (root) namespace.
func rootRules(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "rule", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip rule show: %v: %s", err, out)
	}
	return string(out)
}

// TestDemoKeepRunsUntilInterrupted runs the demo with Keep, talks to the
// kept mesh the way the instructions say, then interrupts it as Ctrl-C would
// and checks that everything is gone.
func TestDemoKeepRunsUntilInterrupted(t *testing.T) {
	privtest.Require(t)
	bin := mantletBinary(t)
	var out, errb meshtest.SyncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Demo(ctx, bin, DemoOptions{Keep: true, Stdout: &out, Stderr: &errb}) }()

	deadline := time.After(60 * time.Second)
	for !strings.Contains(out.String(), "Press Ctrl-C here to remove everything") {
		select {
		case err := <-done:
			t.Fatalf("Demo with Keep returned before Ctrl-C (%v); stdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
		case <-deadline:
			cancel()
			<-done
			t.Fatalf("no instructions within 60 s; stdout:\n%s", out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	// The instructions' first command, in Go: the echo server still answers
	// through the mesh.
	// (Open only reads the testbed's state file; the demo removes it.)
	tb, err := testbed.Open(demoPrefixRE.FindStringSubmatch(out.String())[1])
	if err != nil {
		t.Fatal(err)
	}
	c, err := tb.Pod("client").Dial(ctx, "tcp4", "198.19.2.11:8080")
	if err != nil {
		t.Errorf("the kept mesh does not answer: %v", err)
	} else {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = c.Write([]byte("hello\n"))
		buf := make([]byte, 6)
		if _, err := c.Read(buf); err != nil || string(buf) != "hello\n" {
			t.Errorf("echo through the kept mesh = %q, %v", buf, err)
		}
		c.Close()
	}
	// The command that asks an agent, as printed.
	if cmd := regexp.MustCompile(`mantlet (flows --node \S+)`).FindStringSubmatch(out.String()); cmd == nil {
		t.Error("the instructions name no 'mantlet flows --node' command")
	} else if flows, err := exec.Command(bin, append(strings.Fields(cmd[1]), "--last", "0")...).CombinedOutput(); err != nil ||
		!strings.Contains(string(flows), "shop/client") {
		t.Errorf("mantlet %s: %v\n%s", cmd[1], err, flows)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("interrupted demo: %v; stderr:\n%s", err, errb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the demo did not finish within 60 s of Ctrl-C")
	}
	if !strings.Contains(out.String(), "Interrupted.") || !strings.HasSuffix(out.String(), "Removed.\n") {
		t.Errorf("the demo did not say it removed the mesh:\n%s", out.String())
	}
	checkDemoLeftNothing(t, out.String())
}
