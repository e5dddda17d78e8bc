// Command testapp is the one program of the test images that
// internal/kubecluster builds without a registry: the pod sandbox's pause
// process, a TCP echo server and a client. It is static (no cgo), so an
// image holds nothing else.
//
//	testapp pause                       wait for SIGTERM or SIGINT
//	testapp echo [-listen :8080]        greet each connection with "hello from <host> to <remote>", then echo
//	testapp client -connect ADDR -send TEXT
//	                                    connect, read the greeting, send TEXT, expect it back; print both; exit 1 on failure
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testapp pause|echo|client [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "pause":
		<-ctx.Done()
	case "echo":
		err = echo(ctx, args)
	case "client":
		err = client(ctx, args)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		os.Exit(1)
	}
}

// echo greets every connection with a line that names this host and the
// peer's address as seen here, then sends back what it reads.
func echo(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	listen := fs.String("listen", ":8080", "address to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	host, _ := os.Hostname()
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", *listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); l.Close() }()
	fmt.Printf("echo: listening on %s\n", l.Addr())
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer c.Close()
			fmt.Printf("echo: connection from %s\n", c.RemoteAddr())
			if _, err := fmt.Fprintf(c, "hello from %s to %s\n", host, c.RemoteAddr()); err != nil {
				return
			}
			_, _ = io.Copy(c, c)
		}()
	}
}

// client connects, reads the greeting, sends one line and expects it back.
func client(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	addr := fs.String("connect", "", "address to connect to")
	send := fs.String("send", "ping", "line to send")
	timeout := fs.Duration("timeout", 10*time.Second, "time for the whole exchange")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *addr == "" {
		return errors.New("client: -connect is required")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", *addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("client: read the greeting: %w", err)
	}
	fmt.Print(greeting)
	if _, err := fmt.Fprintf(c, "%s\n", *send); err != nil {
		return err
	}
	back, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("client: read the echo: %w", err)
	}
	if strings.TrimSuffix(back, "\n") != *send {
		return fmt.Errorf("client: sent %q, got %q back", *send, back)
	}
	fmt.Printf("echoed %s", back)
	return nil
}
