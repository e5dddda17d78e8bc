package scenario

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mantlet/mantlet/internal/testbed"
)

// The bench's server and its traffic.
const (
	benchPort = 5201
	// benchMaxServerConns bounds the connections a bench server holds.
	benchMaxServerConns = 256
	benchChunk          = 256 << 10
	benchIOTimeout      = 30 * time.Second
	benchWarmupRTs      = 100
	// clockTicks is USER_HZ, the unit of utime and stime in /proc (100 on
	// every Linux architecture Go supports).
	clockTicks = 100
)

// Modes of a bench connection: its first byte.
const (
	modeSink    = 's' // count bytes until EOF, answer the count (8 bytes, big-endian)
	modeEcho    = 'e' // echo every byte until EOF
	modeConnect = 'c' // answer one byte and close (the server closes first, so the client keeps no TIME_WAIT)
)

// processesCPU returns the user+system CPU time the processes have used.
func processesCPU(pids []int) (time.Duration, error) {
	var total time.Duration
	for _, pid := range pids {
		d, err := processCPU(pid)
		if err != nil {
			return 0, err
		}
		total += d
	}
	return total, nil
}

// processCPU reads utime+stime (all threads) from /proc/<pid>/stat.
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of process %d: %w", pid, err)
	}
	return parseStatCPU(string(b))
}

// parseStatCPU returns utime+stime from the text of /proc/<pid>/stat.
func parseStatCPU(stat string) (time.Duration, error) {
	// The command name (field 2) is in parentheses and may hold spaces;
	// fields after it start with the state (field 3).
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu time: malformed stat %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time: stat has %d fields after the name, want at least 13", len(f))
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// benchServer serves the bench's modes in a pod.
type benchServer struct {
	ln    net.Listener
	slots chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startBenchServer(ctx context.Context, pod *testbed.Pod) (*benchServer, error) {
	ln, err := pod.Listen(ctx, "tcp4", netip.AddrPortFrom(pod.IP, benchPort).String())
	if err != nil {
		return nil, fmt.Errorf("bench server in %s: %w", pod.Name, err)
	}
	s := &benchServer{ln: ln, slots: make(chan struct{}, benchMaxServerConns), conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

func (s *benchServer) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		select {
		case s.slots <- struct{}{}:
		default:
			c.Close() // over the bound
			continue
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
				<-s.slots
			}()
			_ = serveBench(c)
		}()
	}
}

func serveBench(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Minute))
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return err
	}
	switch mode[0] {
	case modeSink:
		n, err := io.CopyBuffer(io.Discard, c, make([]byte, benchChunk))
		if err != nil {
			return err
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		_, err = c.Write(b[:])
		return err
	case modeEcho:
		_, err := io.Copy(c, c)
		return err
	case modeConnect:
		_, err := c.Write(mode[:])
		return err
	default:
		return fmt.Errorf("unknown mode %q", mode[0])
	}
}

// Close stops the server and closes its connections.
func (s *benchServer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// benchDial connects from the path's client; the connection closes when
// ctx is done.
func benchDial(ctx context.Context, p *benchPath, mode byte) (net.Conn, func(), error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.client.Dial(dctx, "tcp4", p.server.String())
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

// benchThroughput sends for d on one connection and returns the bytes the
// server received and the time until it said so.
func benchThroughput(ctx context.Context, p *benchPath, d time.Duration) (int64, time.Duration, error) {
	c, done, err := benchDial(ctx, p, modeSink)
	if err != nil {
		return 0, 0, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(d + benchIOTimeout))
	buf := make([]byte, benchChunk)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, 0, fmt.Errorf("send: %w", err)
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return 0, 0, err
		}
	}
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, 0, fmt.Errorf("read the server's count: %w", err)
	}
	return int64(binary.BigEndian.Uint64(b[:])), time.Since(start), nil
}

// benchEcho makes n 1-byte round trips on one connection (after a few
// unmeasured ones) and returns their durations.
func benchEcho(ctx context.Context, p *benchPath, n int) ([]time.Duration, error) {
	c, done, err := benchDial(ctx, p, modeEcho)
	if err != nil {
		return nil, err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(benchIOTimeout + time.Duration(n)*time.Millisecond))
	rtts := make([]time.Duration, 0, n)
	b := []byte{'x'}
	for i := -min(benchWarmupRTs, n); i < n; i++ {
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		if i >= 0 {
			rtts = append(rtts, time.Since(t0))
		}
	}
	return rtts, nil
}

// benchConnect opens connections one after another for d (at most limit):
// connect, 1 byte each way, close. It returns how many completed and the
// time they took.
func benchConnect(ctx context.Context, p *benchPath, d time.Duration, limit int) (int, time.Duration, error) {
	start := time.Now()
	n := 0
	for n < limit && time.Since(start) < d {
		if err := benchConnectOnce(ctx, p); err != nil {
			return n, time.Since(start), fmt.Errorf("connection %d: %w", n+1, err)
		}
		n++
	}
	return n, time.Since(start), nil
}

func benchConnectOnce(ctx context.Context, p *benchPath) error {
	c, done, err := benchDial(ctx, p, modeConnect)
	if err != nil {
		return err
	}
	defer done()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
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
