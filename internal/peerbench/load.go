package peerbench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mantlet/mantlet/internal/report"
	"github.com/mantlet/mantlet/internal/testbed"
)

// The load the bench makes, from inside the client pod's network
// namespace (its sockets are made there and used from the bench process).
const (
	ioTimeout   = 30 * time.Second
	dialTimeout = 10 * time.Second
	warmupRTs   = 100
	// connWorkers is how many clients open connections at once in the
	// new-connections measurement.
	connWorkers = 8
	// holdDialers is how many connections the hold measurement opens at
	// once.
	holdDialers = 32
)

// dialer opens connections from a path's client to one of its targets.
type dialer struct {
	client  *testbed.Pod
	targets []netip.AddrPort // where the client connects: the server pods, or its local proxies
	// iperf is where the client's iperf3 connects: the iperf3 server in
	// the first server pod, or the local proxy to it; iperf3 is the
	// program.
	iperf  netip.AddrPort
	iperf3 string
}

// dial connects to target i (modulo the targets) and sends the mode byte;
// the connection also closes when ctx is done.
func (d *dialer) dial(ctx context.Context, i int, mode byte) (net.Conn, func(), error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	c, err := d.client.Dial(dctx, "tcp4", d.targets[i%len(d.targets)].String())
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	if _, err := c.Write([]byte{mode}); err != nil {
		stop()
		c.Close()
		return nil, nil, err
	}
	return c, func() { stop(); c.Close() }, nil
}

// throughput runs iperf3 in the client pod against the path's iperf3
// target with streams parallel streams for dur (whole seconds, at least
// one) and returns the bytes the server received and the time it took, as
// iperf3 reports them.
func (d *dialer) throughput(ctx context.Context, streams int, dur time.Duration) (int64, time.Duration, error) {
	secs := max(1, int(dur.Round(time.Second)/time.Second))
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+ioTimeout)
	defer cancel()
	cmd := d.client.Command(ctx, d.iperf3, "--client", d.iperf.Addr().String(), "--port", strconv.Itoa(int(d.iperf.Port())),
		"--time", strconv.Itoa(secs), "--parallel", strconv.Itoa(streams), "--json",
		"--connect-timeout", strconv.Itoa(int(dialTimeout/time.Millisecond)))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var r iperfResult
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return 0, 0, fmt.Errorf("iperf3: %w (output %q, %s)", errors.Join(err, jerr), lastLines(string(out), 3), bytes.TrimSpace(stderr.Bytes()))
	}
	if r.Error != "" || err != nil {
		return 0, 0, fmt.Errorf("iperf3: %s: %w", r.Error, err)
	}
	got := r.End.SumReceived
	if got.Bytes <= 0 || got.Seconds <= 0 {
		return 0, 0, fmt.Errorf("iperf3: the server received %d bytes in %.2f s", got.Bytes, got.Seconds)
	}
	return got.Bytes, time.Duration(got.Seconds * float64(time.Second)), nil
}

// iperfResult is what the bench reads of iperf3's --json output.
type iperfResult struct {
	Error string `json:"error"`
	End   struct {
		SumReceived struct {
			Bytes   int64   `json:"bytes"`
			Seconds float64 `json:"seconds"`
		} `json:"sum_received"`
	} `json:"end"`
}

// echo makes n 1-byte round trips on one connection to the first target
// (after a few unmeasured ones) and returns their median and 99th
// percentile.
func (d *dialer) echo(ctx context.Context, n int) (p50, p99 time.Duration, err error) {
	c, done, err := d.dial(ctx, 0, modeEcho)
	if err != nil {
		return 0, 0, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(ioTimeout + time.Duration(n)*time.Millisecond))
	rtts := make([]time.Duration, 0, n)
	b := []byte{'x'}
	for i := -min(warmupRTs, n); i < n; i++ {
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return 0, 0, fmt.Errorf("round trip %d: %w", i, err)
		}
		if i >= 0 {
			rtts = append(rtts, time.Since(t0))
		}
	}
	return report.Percentile(rtts, 50), report.Percentile(rtts, 99), nil
}

// echoFor makes 1-byte round trips on one connection for dur (a profile's
// length) and returns how many it made.
func (d *dialer) echoFor(ctx context.Context, dur time.Duration) (int, error) {
	c, done, err := d.dial(ctx, 0, modeEcho)
	if err != nil {
		return 0, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(dur + ioTimeout))
	b := []byte{'x'}
	n := 0
	for start := time.Now(); time.Since(start) < dur; n++ {
		if _, err := c.Write(b); err != nil {
			return n, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return n, fmt.Errorf("round trip %d: %w", n, err)
		}
	}
	return n, nil
}

// connect runs connWorkers clients that each open connections to the
// first target one after another for dur (at most limit in all): connect,
// 1 byte each way, close. It returns how many completed and the time they
// took.
func (d *dialer) connect(ctx context.Context, dur time.Duration, limit int) (int, time.Duration, error) {
	var (
		count atomic.Int64
		wg    sync.WaitGroup
		errs  = make([]error, connWorkers)
	)
	start := time.Now()
	for w := range connWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < dur && ctx.Err() == nil {
				if count.Add(1) > int64(limit) {
					count.Add(-1)
					return
				}
				if err := d.connectOnce(ctx); err != nil {
					count.Add(-1)
					errs[w] = fmt.Errorf("client %d: %w", w+1, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return int(count.Load()), time.Since(start), errors.Join(errs...)
}

func (d *dialer) connectOnce(ctx context.Context) error {
	c, done, err := d.dial(ctx, 0, modeConnect)
	if err != nil {
		return err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	// The answer, then the server's FIN: the server closes first.
	r := bufio.NewReaderSize(c, 16)
	if b, err := r.ReadByte(); err != nil || b != modeConnect {
		return fmt.Errorf("answer %q: %v", b, err)
	}
	if _, err := r.ReadByte(); err != io.EOF {
		return fmt.Errorf("want the server to close, got %v", err)
	}
	return nil
}

// hold opens n connections spread over the targets, each answered by the
// server (so the whole path carries it), and returns them; close them
// with closeAll.
func (d *dialer) hold(ctx context.Context, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		errs = make([]error, holdDialers)
	)
	for w := range holdDialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				dctx, cancel := context.WithTimeout(ctx, dialTimeout)
				c, err := d.client.Dial(dctx, "tcp4", d.targets[i%len(d.targets)].String())
				cancel()
				if err == nil {
					err = holdHandshake(c)
				}
				if err != nil {
					if c != nil {
						c.Close()
					}
					errs[w] = fmt.Errorf("connection %d of %d: %w", i+1, n, err)
					return
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func holdHandshake(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write([]byte{modeHold}); err != nil {
		return err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != modeHold {
		return fmt.Errorf("answer %q: %v", b[0], err)
	}
	return c.SetDeadline(time.Time{})
}

// closeAll closes the connections hold returned.
func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}
