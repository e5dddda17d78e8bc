package hbone

import (
	"bytes"
	"testing"
	"time"
)

// recordWriter records the size of every write.
type recordWriter struct {
	sizes []int
	buf   bytes.Buffer
}

func (w *recordWriter) Write(p []byte) (int, error) {
	w.sizes = append(w.sizes, len(p))
	return w.buf.Write(p)
}

func TestFrameWriterWritesWholeRecords(t *testing.T) {
	// A 9-byte frame header and a 64 KiB payload go out as four writes of
	// 16 KiB and leave 9 bytes buffered for the next frame or the flush:
	// every TLS record is full.
	rw := &recordWriter{}
	fw := frameWriter{w: rw}
	payload := bytes.Repeat([]byte{7}, 64<<10)
	want := append(make([]byte, 9), payload...)
	for range 2 {
		fw.Write(make([]byte, 9))
		fw.Write(payload)
	}
	if err := fw.flush(); err != nil {
		t.Fatal(err)
	}
	fw.release()
	for i, n := range rw.sizes[:len(rw.sizes)-1] {
		if n%wbufSize != 0 {
			t.Fatalf("write %d of %v is %d bytes, not whole records", i, rw.sizes, n)
		}
	}
	if got := rw.buf.Bytes(); !bytes.Equal(got, append(want, want...)) {
		t.Fatalf("wrote %d bytes, not the frames in order", len(got))
	}
	if fw.buf != nil {
		t.Fatal("the buffer was not given back")
	}
}

func TestRingKeepsOrderAndDropsLargeStorageWhenEmpty(t *testing.T) {
	var r ring[int]
	next, want := 0, 0
	for round := range 200 { // pushes and pops interleaved, wrapping around
		for range round%7 + 1 {
			r.push(next)
			next++
		}
		for range round % 5 {
			if v, ok := r.pop(); ok {
				if v != want {
					t.Fatalf("pop = %d, want %d", v, want)
				}
				want++
			}
		}
	}
	for r.n > 0 {
		if v, _ := r.pop(); v != want {
			t.Fatalf("pop = %d, want %d", v, want)
		}
		want++
	}
	if want != next || r.buf != nil {
		t.Fatalf("popped %d of %d; storage kept: %d slots", want, next, len(r.buf))
	}
}

func TestBucket(t *testing.T) {
	var b bucket
	now := time.Unix(1000, 0)
	for i := range 3 {
		if !b.take(now, 2, 3) {
			t.Fatalf("take %d of a burst of 3 failed", i)
		}
	}
	if b.take(now, 2, 3) {
		t.Fatal("a fourth take at once succeeded")
	}
	if !b.take(now.Add(500*time.Millisecond), 2, 3) || b.take(now.Add(500*time.Millisecond), 2, 3) {
		t.Fatal("half a second at 2/s should give exactly one token")
	}
}
