package hbone_test

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// Both TCP directions full at once must not stall the connection: the
// server keeps reading (and acknowledging) while its own writes wait for a
// client that does not read, so a client whose read loop waits for its
// writer (as our server's did) gets its writes through, then reads.
//
// The connection is a net.Pipe: no socket buffer at all, every write waits
// for the other side to read, which makes the cycle deterministic. On the
// old design (the read loop wrote PING acks under the lock that the
// blocked Stream.Write held) the client's first write after the PING
// never completed: both ends waited for each other until the write
// deadline.
func TestBothDirectionsFullDoNotDeadlock(t *testing.T) {
	const down = 1 << 20    // what the server's app writes before it reads
	const up = 3 * 16 << 10 // what the client's app writes before it reads (within the server's window)
	gotUp := make(chan int64, 1)
	e := newRawEnv(t, hbone.Tuning{}, func(_ context.Context, s *hbone.Stream) {
		if err := s.Respond(http.StatusOK); err != nil {
			gotUp <- -1
			return
		}
		if _, err := s.Write(make([]byte, down)); err != nil {
			gotUp <- -1
			return
		}
		n, _ := io.Copy(io.Discard, s)
		s.CloseWrite()
		gotUp <- n
	})
	// The client stops reading as soon as it has the 200: from then on the
	// server's Write is blocked on the network.
	rc := e.pipe(nil, func(s frameSummary) bool { return s.typ == http2.FrameHeaders && s.id == 1 })
	if err := rc.connect(1, false); err != nil {
		t.Fatal(err)
	}
	if st, err := rc.status(1); err != nil || st != "200" {
		t.Fatalf("status %q, %v; want 200", st, err)
	}
	// Now the client writes without reading: PINGs (which ask the server
	// for an answer) between DATA frames.
	payload := make([]byte, 16<<10)
	err := rc.write(func(fr *http2.Framer) error {
		for i := range 3 {
			if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
				return err
			}
			if err := fr.WriteData(1, i == 2, payload); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("the server stopped reading while its own write waited for the client (deadlock): %v", err)
	}
	rc.resume()
	var down1 int
	acks := 0
	for {
		s, err := rc.next(20 * time.Second)
		if err != nil {
			t.Fatalf("after %d bytes and %d PING acks: %v", down1, acks, err)
		}
		switch {
		case s.typ == http2.FramePing && s.end:
			acks++
		case s.typ == http2.FrameData && s.id == 1:
			down1 += s.n
		}
		if s.typ == http2.FrameData && s.end {
			break
		}
	}
	if down1 != down || acks != 3 {
		t.Fatalf("client got %d bytes and %d PING acks, want %d and 3", down1, acks, down)
	}
	if n := <-gotUp; n != up {
		t.Fatalf("server's app read %d bytes, want %d", n, up)
	}
}
