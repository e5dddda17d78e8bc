package peerbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// AppPort is the port of the bench's application server in every server
// pod; IperfPort that of the iperf3 server in the first server pod of each
// path (the throughput figures are iperf3's).
const (
	AppPort   = 5201
	IperfPort = 5202
)

// Modes of a bench connection: its first byte, sent by the client.
const (
	modeEcho    = 'e' // echo every byte until EOF
	modeConnect = 'c' // answer one byte and close (the server closes first, so the client keeps no TIME_WAIT)
	modeHold    = 'h' // answer one byte, then wait for the client's EOF
)

// ServeApp runs the bench's application server on addr until ctx is done:
// an echo, a connect-and-close and a hold mode, chosen by a
// connection's first byte. `mantlet bench --serve-app` runs it inside each
// server pod, in a process of its own, so that the server's sockets and
// CPU are not the bench's.
func ServeApp(ctx context.Context, addr string, log *slog.Logger) error {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(ctx, "tcp4", addr)
	if err != nil {
		return fmt.Errorf("peerbench: app server: %w", err)
	}
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	log.Info("app server listening", "addr", ln.Addr().String())
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("peerbench: app server: accept: %w", err)
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := serveConn(c); err != nil && !errors.Is(err, net.ErrClosed) {
				log.Debug("app connection", "remote", c.RemoteAddr().String(), "err", err)
			}
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
	wg.Wait()
	return nil
}

func serveConn(c net.Conn) error {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return err
	}
	switch mode[0] {
	case modeEcho:
		buf := make([]byte, 512)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return werr
				}
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
	case modeConnect:
		_, err := c.Write(mode[:])
		return err
	case modeHold:
		if _, err := c.Write(mode[:]); err != nil {
			return err
		}
		var b [1]byte
		_, err := c.Read(b[:])
		if err == io.EOF {
			return nil
		}
		return err
	default:
		return fmt.Errorf("unknown mode %q", mode[0])
	}
}
