package hbone

import "sync"

// BufSize is the size of the pooled copy buffers: one socket read, and so
// at most one DATA frame, per buffer. docs/performance.md records how it
// was chosen.
const BufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, BufSize); return &b }}

// GetBuf returns a pooled buffer of BufSize bytes; give it back with PutBuf.
func GetBuf() *[]byte { return bufPool.Get().(*[]byte) }

// PutBuf returns a buffer obtained from GetBuf.
func PutBuf(b *[]byte) { bufPool.Put(b) }

// chunkSize is the unit of a stream's receive queue.
const chunkSize = 16 << 10

var chunkPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// recvQueue holds the bytes a stream received and its reader has not read
// yet: a FIFO of pooled chunks. Its size is bounded by the stream's
// flow-control window. The caller synchronises access.
type recvQueue struct {
	chunks []*[]byte
	head   int // read offset in chunks[0]
	tail   int // write offset in chunks[len-1]
	n      int // bytes queued
}

func (q *recvQueue) write(p []byte) {
	for len(p) > 0 {
		if len(q.chunks) == 0 || q.tail == chunkSize {
			q.chunks = append(q.chunks, chunkPool.Get().(*[]byte))
			q.tail = 0
		}
		c := *q.chunks[len(q.chunks)-1]
		n := copy(c[q.tail:], p)
		q.tail += n
		q.n += n
		p = p[n:]
	}
}

func (q *recvQueue) read(p []byte) int {
	total := 0
	for len(p) > 0 && q.n > 0 {
		c := *q.chunks[0]
		end := chunkSize
		if len(q.chunks) == 1 {
			end = q.tail
		}
		n := copy(p, c[q.head:end])
		q.head += n
		q.n -= n
		total += n
		p = p[n:]
		if q.head == end {
			q.pop()
		}
	}
	return total
}

func (q *recvQueue) pop() {
	chunkPool.Put(q.chunks[0])
	q.chunks[0] = nil
	q.chunks = q.chunks[1:]
	q.head = 0
	if len(q.chunks) == 0 {
		q.chunks = nil
		q.tail = 0
	}
}

// reset drops everything queued and returns how many bytes it dropped.
func (q *recvQueue) reset() int {
	n := q.n
	for len(q.chunks) > 0 {
		q.pop()
	}
	q.n = 0
	return n
}
