package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/bpf"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// binary is the mantlet command the agents run: built once by TestMain, or
// taken from $MANTLET_TEST_BINARY.
var binary string

// spireBinary is mantlet built with -tags spire, for the SPIRE tests: built
// with binary, or taken from $MANTLET_TEST_SPIRE_BINARY.
var spireBinary string

const spireBinaryEnv = "MANTLET_TEST_SPIRE_BINARY"

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if binary = os.Getenv(meshtest.BinaryEnv); binary == "" && os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "mantlet-e2e-*")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if binary, err = meshtest.Build(ctx, dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if spireBinary, err = meshtest.Build(ctx, dir, "spire"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	if spireBinary == "" {
		spireBinary = os.Getenv(spireBinaryEnv)
	}
	code := m.Run()
	if code == 0 {
		if left := leftovers(); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: left behind after the tests: %v\n", left)
			return 1
		}
	}
	return code
}

// prefixes are the testbed prefixes of the meshes the tests started.
var (
	prefixMu sync.Mutex
	prefixes []string
)

// leftovers lists the namespaces and pin directories of the tests'
// meshes that still exist.
func leftovers() []string {
	prefixMu.Lock()
	defer prefixMu.Unlock()
	var left []string
	for _, p := range prefixes {
		for _, pattern := range []string{"/run/netns/" + p + "-*", bpf.DefaultPinRoot + "/" + p + "-*"} {
			found, _ := filepath.Glob(pattern)
			left = append(left, found...)
		}
	}
	return left
}

// Names used by the tests' clusters.
const (
	meshed   = "mantlet.io/mesh"
	appPort  = 8080
	dropWait = 1500 * time.Millisecond // how long a dropped SYN is given to prove it was dropped
)

var meshedNS = map[string]string{meshed: "enabled"}

// startMesh starts a mesh for the test and closes it when the test ends;
// when the test failed, the agents' logs go to the test log. The agents
// run binary unless opts names a wrapper of it (prlimit, say).
func startMesh(t testing.TB, spec testbed.Spec, opts meshtest.Options) *meshtest.Mesh {
	t.Helper()
	privtest.Require(t)
	if opts.Binary == "" {
		opts.Binary = binary
	}
	m, err := meshtest.Start(context.Background(), spec, opts)
	if err != nil {
		t.Fatal(err)
	}
	prefixMu.Lock()
	prefixes = append(prefixes, m.TB.Prefix())
	prefixMu.Unlock()
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range m.TB.Nodes() {
				t.Logf("agent logs of %s:\n%s", n.Name, m.AllLogs(n.Name))
			}
		}
		if err := m.Close(); err != nil {
			t.Errorf("close mesh: %v", err)
		}
	})
	return m
}

// echo starts an echo server on port of pod until the test ends.
func echo(t testing.TB, m *meshtest.Mesh, pod string, port uint16) *meshtest.Echo {
	t.Helper()
	e, err := m.Echo(context.Background(), pod, port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// dial connects from pod to addr and closes the connection when the test
// ends.
func dial(t *testing.T, m *meshtest.Mesh, pod string, addr netip.AddrPort) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := m.Dial(ctx, pod, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// dialFails checks that a connection from pod to addr cannot be made
// within dropWait.
func dialFails(t *testing.T, m *meshtest.Mesh, pod string, addr netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dropWait)
	defer cancel()
	c, err := m.Dial(ctx, pod, addr)
	if err == nil {
		c.Close()
		t.Fatalf("%s connected to %s; want the connection attempt dropped", pod, addr)
	}
}

// ping sends msg on c and checks that the echo server sends it back.
func ping(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read the echo of %q: %v", msg, err)
	}
	if string(buf) != msg {
		t.Fatalf("echo = %q, want %q", buf, msg)
	}
}

// roundTrip sends payload through the echo server on c while reading the
// echo, then half-closes c and checks that all of payload came back
// unchanged followed by the server's own close.
func roundTrip(t *testing.T, c *net.TCPConn, payload []byte) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c) // ends with the server's FIN
	if err := <-werr; err != nil {
		t.Fatalf("send %d bytes, then half-close: %v", len(payload), err)
	}
	if rerr != nil {
		t.Fatalf("read the echo: %v (after %d of %d bytes)", rerr, len(got), len(payload))
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo: got %d bytes, want the %d sent (first difference at %d)", len(got), len(payload), firstDiff(got, payload))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// newMarker returns a string that appears nowhere by chance.
func newMarker(t *testing.T) string {
	return fmt.Sprintf("MANTLET-E2E-MARKER-%x", randomBytes(t, 8))
}

// capture records the underlay until the returned function is called; it
// returns the packets and fails the test if any were lost (a claim that
// something was not seen would prove nothing).
func capture(t *testing.T, m *meshtest.Mesh) func() []testbed.Packet {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c, err := m.TB.Capture(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stopped := false
	stop := func() []testbed.Packet {
		t.Helper()
		if stopped {
			t.Fatal("capture stopped twice")
		}
		stopped = true
		// Let the last segments cross the bridge.
		time.Sleep(100 * time.Millisecond)
		pkts, err := c.Stop()
		cancel()
		if errors.Is(err, testbed.ErrCaptureLost) {
			t.Fatalf("the capture lost packets: %v", err)
		} else if err != nil {
			t.Fatal(err)
		}
		return pkts
	}
	t.Cleanup(func() {
		if !stopped {
			_, _ = c.Stop()
			cancel()
		}
	})
	return stop
}

// syns returns the connection attempts (SYN without ACK) in pkts towards
// dst's IP, and towards dst's port too when it is not 0.
func syns(pkts []testbed.Packet, dst netip.AddrPort) []testbed.Packet {
	var out []testbed.Packet
	for _, p := range pkts {
		if p.Proto != testbed.ProtoTCP || !p.Flags.Has(testbed.SYN) || p.Flags.Has(testbed.ACK) {
			continue
		}
		if p.Dst.Addr() == dst.Addr() && (dst.Port() == 0 || p.Dst.Port() == dst.Port()) {
			out = append(out, p)
		}
	}
	return out
}

// counters reads node's data path counters.
func counters(t *testing.T, m *meshtest.Mesh, node string) bpf.Counters {
	t.Helper()
	c, err := m.Counters(node)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
