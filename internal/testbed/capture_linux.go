//go:build linux

package testbed

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Capture records the IPv4 packets that cross the underlay bridge. Each
// packet is recorded once, as it enters the bridge from a node's uplink.
type Capture struct {
	fd       int
	ports    map[int]string // bridge port ifindex → node name
	stopping atomic.Bool
	stopOnce sync.Once
	done     chan struct{}

	// Owned by the reader until done is closed.
	pkts  []Packet
	size  int
	lost  int
	rerr  error
	stats unix.TpacketStats
	serr  error
}

// Capture starts recording the underlay: an AF_PACKET socket in the
// underlay namespace, read by one goroutine into a bounded buffer. It
// records until Stop is called or ctx is done.
func (tb *Testbed) Capture(ctx context.Context) (*Capture, error) {
	ports, err := tb.bridgePorts()
	if err != nil {
		return nil, err
	}
	c := &Capture{fd: -1, ports: ports, done: make(chan struct{})}
	err = inNamespace(tb.underlay, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("testbed: capture socket: %w", err)
		}
		c.fd = fd
		return nil
	})
	if err != nil {
		return nil, err
	}
	// A large receive buffer rides out bursts; losses are reported anyway.
	if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); err != nil {
		_ = unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 32<<20)
	}
	go c.read()
	go func() {
		select {
		case <-ctx.Done():
			c.stopping.Store(true)
		case <-c.done:
		}
	}()
	return c, nil
}

func (tb *Testbed) bridgePorts() (map[int]string, error) {
	h, err := netns.GetFromPath(tb.underlay)
	if err != nil {
		return nil, fmt.Errorf("testbed: capture: open underlay: %w", err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("testbed: capture: netlink handle: %w", err)
	}
	defer nl.Close()
	ports := map[int]string{}
	for i, n := range tb.nodes {
		l, err := nl.LinkByName(bridgePort(i))
		if err != nil {
			return nil, fmt.Errorf("testbed: capture: bridge port of node %s: %w", n.Name, err)
		}
		ports[l.Attrs().Index] = n.Name
	}
	return ports, nil
}

// quiet is how long the underlay must be silent before Stop returns, so
// that packets still in flight (FINs, last ACKs) are recorded.
const (
	quiet    = 50 * time.Millisecond
	maxDrain = time.Second
)

func (c *Capture) read() {
	defer close(c.done)
	buf := make([]byte, 256<<10)
	last := time.Now()
	var stopAt time.Time
	for {
		n, from, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if errors.Is(err, unix.EAGAIN) {
			if c.stopping.Load() {
				if stopAt.IsZero() {
					stopAt = time.Now()
				}
				if time.Since(last) >= quiet || time.Since(stopAt) >= maxDrain {
					return
				}
			}
			_, _ = unix.Poll([]unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}, int(quiet/time.Millisecond)/2)
			continue
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			c.rerr = fmt.Errorf("testbed: capture read: %w", err)
			return
		}
		last = time.Now()
		sll, ok := from.(*unix.SockaddrLinklayer)
		if !ok || sll.Pkttype == unix.PACKET_OUTGOING {
			continue // seen when it entered the bridge
		}
		node, ok := c.ports[sll.Ifindex]
		if !ok {
			continue // the bridge device itself (broadcasts)
		}
		if n > len(buf) {
			c.lost++
			continue
		}
		p, ok := parseFrame(buf[:n])
		if !ok {
			continue
		}
		if len(c.pkts) >= captureMaxPackets || c.size+len(p.Payload) > captureMaxBytes {
			c.lost++
			continue
		}
		p.Time, p.Node = last, node
		c.size += len(p.Payload)
		c.pkts = append(c.pkts, p)
	}
}

// Stop waits until the underlay has been quiet for a moment (at most a
// second), stops recording and returns the packets in the order they were
// seen. When packets were lost it returns them with an error wrapping
// ErrCaptureLost. Stop may be called more than once.
func (c *Capture) Stop() ([]Packet, error) {
	c.stopOnce.Do(func() {
		c.stopping.Store(true)
		<-c.done
		c.stats, c.serr = getStats(c.fd)
		_ = unix.Close(c.fd)
	})
	var errs []error
	if c.rerr != nil {
		errs = append(errs, c.rerr)
	}
	if c.serr != nil {
		errs = append(errs, fmt.Errorf("testbed: capture statistics: %w", c.serr))
	}
	if lost := c.lost + int(c.stats.Drops); lost > 0 {
		errs = append(errs, fmt.Errorf("%w: %d of %d", ErrCaptureLost, lost, lost+len(c.pkts)))
	}
	return c.pkts, errors.Join(errs...)
}

func getStats(fd int) (unix.TpacketStats, error) {
	st, err := unix.GetsockoptTpacketStats(fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	if err != nil {
		return unix.TpacketStats{}, err
	}
	return *st, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
