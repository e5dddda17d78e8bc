package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// chunk is what a transfer's sender sends before the test cuts it.
const chunk = 1 << 20

// party is an application's end of a transfer: it reads until its
// connection ends or fails.
type party struct {
	c       *net.TCPConn
	reached chan struct{} // closed once chunk bytes were read
	ended   chan struct{} // closed when the read ended; then err is set
	err     error         // nil for EOF
}

func newParty(c *net.TCPConn) *party {
	p := &party{c: c, reached: make(chan struct{}), ended: make(chan struct{})}
	// Bounds a failing test only.
	_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
	go func() {
		defer close(p.ended)
		buf := make([]byte, 64<<10)
		var n int64
		for {
			k, err := c.Read(buf)
			if n += int64(k); n >= chunk && n-int64(k) < chunk {
				close(p.reached)
			}
			if err != nil {
				if err != io.EOF {
					p.err = err
				}
				return
			}
		}
	}()
	return p
}

// end waits for the party's read to end and returns how (nil: EOF).
func (p *party) end(t *testing.T, who string) error {
	t.Helper()
	select {
	case <-p.ended:
		return p.err
	case <-time.After(60 * time.Second):
		t.Fatalf("%s: the read did not end", who)
		return nil
	}
}

// reset closes the party's connection with a reset (SO_LINGER 0).
func (p *party) reset() {
	_ = p.c.SetLinger(0)
	_ = p.c.Close()
}

// transfer is one connection from a client pod to a server pod, cut in the
// middle: its sender sent a chunk, the receiver read all of it, and the
// sender neither sends more nor ends its data.
type transfer struct {
	name           string
	upload         bool // the client sends; the server otherwise
	client, server *party
	src            netip.AddrPort // the client's address
}

// startTransfer opens a connection from pod from to a listener on port of
// pod to and brings it to the middle of a transfer.
func startTransfer(t *testing.T, m *meshtest.Mesh, name, from, to string, port uint16, upload bool) *transfer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dst := netip.AddrPortFrom(m.Pod(to).IP, port)
	ln, err := m.Pod(to).Listen(ctx, "tcp4", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := dial(t, m, from, dst)
	_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(30 * time.Second))
	s, err := ln.Accept()
	if err != nil {
		t.Fatalf("%s: the server accepted nothing: %v", name, err)
	}
	t.Cleanup(func() { s.Close() })
	tr := &transfer{name: name, upload: upload, client: newParty(c), server: newParty(s.(*net.TCPConn)),
		src: netip.MustParseAddrPort(c.LocalAddr().String())}
	sender, receiver := tr.server, tr.client
	if upload {
		sender, receiver = tr.client, tr.server
	}
	// The sender's write has returned before the cut, so that the reset
	// reaches its read (the kernel reports a reset once, to whichever call
	// comes first).
	wrote := make(chan error, 1)
	go func() { _, err := sender.c.Write(bytes.Repeat([]byte{'m'}, chunk)); wrote <- err }()
	select {
	case <-receiver.reached:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: the receiver did not get the first %d bytes", name, chunk)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return tr
}

// wantReset checks that the party's read ends with a reset.
func (tr *transfer) wantReset(t *testing.T, who string, p *party) {
	t.Helper()
	if err := p.end(t, tr.name+": "+who); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("%s: the %s's read ended with %v; want a reset (ECONNRESET), not an end of data", tr.name, who, err)
	}
}

// wantFlow checks that node's ztunnel recorded the transfer's flow, in
// direction dir, with flag.
func (tr *transfer) wantFlow(t *testing.T, m *meshtest.Mesh, node, dir, flag string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := m.WaitFlow(ctx, node, func(f meshtest.Flow) bool { return f.Direction == dir && f.Src == tr.src })
	if err != nil {
		t.Errorf("%s: %s recorded no %s flow: %v", tr.name, node, dir, err)
	} else if f.Flag != flag {
		t.Errorf("%s: %s recorded the %s flow with flag %q (%s), want %q", tr.name, node, dir, f.Flag, f.Error, flag)
	}
}

func direction(upload bool) string {
	if upload {
		return "upload"
	}
	return "download"
}

// TestAbnormalEndsReachTheApplicationsAsResets cuts transfers in the middle
// and checks that both applications' reads end with a reset, never with an
// end of data, and that the surviving ztunnels say why: the server
// application resets, the client application resets, the destination
// node's agent dies (SIGKILL), the source node's agent dies. The transfers
// go over HBONE in both directions; the source's death also cuts the
// same-node, passthrough and inbound plaintext paths.
func TestAbnormalEndsReachTheApplicationsAsResets(t *testing.T) {
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Pods: []testbed.PodSpec{
				{Name: "client", Namespace: "shop", ServiceAccount: "client"},
				{Name: "neighbour", Namespace: "shop", ServiceAccount: "neighbour"},
			}},
			{Name: "node2", Pods: []testbed.PodSpec{
				{Name: "server", Namespace: "shop", ServiceAccount: "server"},
				{Name: "outside", Namespace: "plain"},
				{Name: "legacy", Namespace: "plain"},
			}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{})
	port := uint16(appPort)
	next := func() uint16 { port++; return port }

	t.Run("the applications reset", func(t *testing.T) {
		var trs []*transfer
		for _, resetter := range []string{"server", "client"} {
			for _, upload := range []bool{false, true} {
				name := fmt.Sprintf("the %s resets mid-%s", resetter, direction(upload))
				trs = append(trs, startTransfer(t, m, name, "client", "server", next(), upload))
			}
		}
		for _, tr := range trs[:2] {
			tr.server.reset()
		}
		for _, tr := range trs[2:] {
			tr.client.reset()
		}
		for _, tr := range trs[:2] {
			tr.wantReset(t, "client", tr.client)
			tr.wantFlow(t, m, "node1", "outbound", "upstream_reset")
			tr.wantFlow(t, m, "node2", "inbound", "upstream_reset")
		}
		for _, tr := range trs[2:] {
			tr.wantReset(t, "server", tr.server)
			tr.wantFlow(t, m, "node1", "outbound", "downstream_reset")
			tr.wantFlow(t, m, "node2", "inbound", "tunnel_reset")
		}
	})

	t.Run("the destination's agent dies", func(t *testing.T) {
		var trs []*transfer
		for _, upload := range []bool{false, true} {
			trs = append(trs, startTransfer(t, m, "hbone "+direction(upload), "client", "server", next(), upload))
		}
		if err := m.KillAgent("node2"); err != nil {
			t.Fatal(err)
		}
		for _, tr := range trs {
			tr.wantReset(t, "client", tr.client)
			tr.wantReset(t, "server", tr.server)
			tr.wantFlow(t, m, "node1", "outbound", "tunnel_lost")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := m.StartAgent(ctx, "node2"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the source's agent dies", func(t *testing.T) {
		var trs, hbone []*transfer
		for _, upload := range []bool{false, true} {
			dir := direction(upload)
			tr := startTransfer(t, m, "hbone "+dir, "client", "server", next(), upload)
			hbone = append(hbone, tr)
			trs = append(trs, tr,
				startTransfer(t, m, "same node "+dir, "client", "neighbour", next(), upload),
				startTransfer(t, m, "passthrough "+dir, "client", "outside", next(), upload),
				startTransfer(t, m, "inbound plaintext "+dir, "legacy", "neighbour", next(), upload))
		}
		if err := m.KillAgent("node1"); err != nil {
			t.Fatal(err)
		}
		for _, tr := range trs {
			tr.wantReset(t, "client", tr.client)
			tr.wantReset(t, "server", tr.server)
		}
		for _, tr := range hbone {
			tr.wantFlow(t, m, "node2", "inbound", "tunnel_lost")
		}
	})
}
