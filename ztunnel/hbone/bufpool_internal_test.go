package hbone

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestRecvQueueAgainstABuffer drives a recvQueue with random writes,
// adds, reads, takes and resets, and compares it with a bytes.Buffer.
func TestRecvQueueAgainstABuffer(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var q recvQueue
	var model bytes.Buffer
	next := byte(0)
	fill := func(p []byte) {
		for i := range p {
			p[i] = next
			next++
		}
	}
	for i := range 100000 {
		switch r.IntN(5) {
		case 0:
			p := make([]byte, r.IntN(600))
			fill(p)
			q.write(p)
			model.Write(p)
		case 1:
			k := 1 + r.IntN(chunkSize)
			c := getChunk()
			fill((*c)[:k])
			model.Write((*c)[:k])
			q.add(c, k)
		case 2:
			p := make([]byte, r.IntN(40000))
			n := q.read(p)
			want := model.Next(n)
			if !bytes.Equal(p[:n], want) {
				t.Fatalf("step %d: read %d bytes that differ from the model", i, n)
			}
		case 3:
			c, p := q.take()
			if c == nil {
				if model.Len() != 0 {
					t.Fatalf("step %d: take found nothing, %d bytes queued", i, model.Len())
				}
				continue
			}
			if want := model.Next(len(p)); !bytes.Equal(p, want) {
				t.Fatalf("step %d: took %d bytes that differ from the model", i, len(p))
			}
			putChunk(c)
		case 4:
			if r.IntN(20) == 0 {
				if n := q.reset(); n != model.Len() {
					t.Fatalf("step %d: reset dropped %d bytes, %d queued", i, n, model.Len())
				}
				model.Reset()
			}
		}
		if q.n != model.Len() {
			t.Fatalf("step %d: queue holds %d bytes, model %d", i, q.n, model.Len())
		}
		// An empty queue holds no chunk, and at most keptChunks slots.
		if q.n == 0 && (len(q.chunks) != 0 || cap(q.chunks) > keptChunks) {
			t.Fatalf("step %d: an empty queue keeps %d chunks in %d slots", i, len(q.chunks), cap(q.chunks))
		}
	}
}
