package hbone_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// What the ztunnel relies on to tell an orderly end from a broken one:
// io.EOF only for END_STREAM, a reset's code on both sides.

func TestServerResetReachesClientWithItsCode(t *testing.T) {
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		s.Respond(http.StatusOK)
		s.Write([]byte("partial"))
		s.Reset(http2.ErrCodeConnect)
	})
	// The body stays open: the reset, not the client, ends the stream.
	pr, pw := io.Pipe()
	cs, err := e.pool.Connect(t.Context(), e.req(pr))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	defer pw.Close()
	got, err := io.ReadAll(cs)
	var re *hbone.ResetError
	if !errors.As(err, &re) || re.Code != http2.ErrCodeConnect || !errors.Is(err, hbone.ErrStreamClosed) {
		t.Fatalf("client read %q, %v; want the data, then a ResetError CONNECT_ERROR", got, err)
	}
	if string(got) != "partial" {
		t.Fatalf("client read %q before the reset, want %q", got, "partial")
	}
}

func TestClientBodyErrorReachesServerAsReset(t *testing.T) {
	errc := make(chan error, 1)
	started := make(chan struct{})
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		s.Respond(http.StatusOK)
		close(started)
		_, err := io.Copy(io.Discard, s)
		errc <- err
	})
	pr, pw := io.Pipe()
	cs, err := e.pool.Connect(t.Context(), e.req(pr))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	pw.Write([]byte("some"))
	<-started
	// A body that fails (as a client socket the application reset would):
	// the pool resets the stream with CANCEL.
	pw.CloseWithError(errors.New("connection reset by peer"))
	select {
	case err := <-errc:
		var re *hbone.ResetError
		if !errors.As(err, &re) || re.Code != http2.ErrCodeCancel || !errors.Is(err, hbone.ErrStreamClosed) {
			t.Fatalf("server read ended with %v; want a ResetError CANCEL wrapping ErrStreamClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server's read did not end after the client reset the stream")
	}
}

func TestConnectionLossIsNoEOFAndNoReset(t *testing.T) {
	errc := make(chan error, 1)
	started := make(chan struct{})
	e := newEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		s.Respond(http.StatusOK)
		close(started)
		_, err := io.Copy(io.Discard, s)
		errc <- err
	})
	pr, pw := io.Pipe()
	cs, err := e.pool.Connect(t.Context(), e.req(pr))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	defer pw.Close()
	<-started
	e.pool.Close() // the connection goes, the stream never ended
	select {
	case err := <-errc:
		var re *hbone.ResetError
		if err == nil || errors.As(err, &re) || !errors.Is(err, hbone.ErrStreamClosed) {
			t.Fatalf("server read ended with %v; want ErrStreamClosed, neither EOF nor a reset", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server's read did not end after the connection closed")
	}
}
