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

func getChunk() *[]byte { return chunkPool.Get().(*[]byte) }

// putChunk gives c back to its pool: a chunk, or a BufSize buffer that
// took a large frame (readData); nil is ignored.
func putChunk(c *[]byte) {
	switch {
	case c == nil:
	case len(*c) == BufSize:
		bufPool.Put(c)
	default:
		chunkPool.Put(c)
	}
}

// recvQueue holds the bytes a stream received and its reader has not read
// yet: a FIFO of pooled chunks (16 KiB, or BufSize for the payload of a
// large frame), none while it is empty. Its size is
// bounded by the stream's flow-control window. The caller synchronises
// access.
type recvQueue struct {
	chunks []qchunk
	head   int // read offset in chunks[0]
	n      int // bytes queued
}

// qchunk is a chunk of a recvQueue and how much of it is filled.
type qchunk struct {
	c   *[]byte
	end int
}

// last returns the chunk that is written to, nil when there is none.
func (q *recvQueue) last() *qchunk {
	if len(q.chunks) == 0 {
		return nil
	}
	return &q.chunks[len(q.chunks)-1]
}

func (q *recvQueue) write(p []byte) {
	for len(p) > 0 {
		l := q.last()
		if l == nil || l.end == len(*l.c) {
			q.chunks = append(q.chunks, qchunk{c: getChunk()})
			l = q.last()
		}
		n := copy((*l.c)[l.end:], p)
		l.end += n
		q.n += n
		p = p[n:]
	}
}

// add queues the first k bytes of chunk c, which the queue then owns: they
// are copied into the last chunk when they fit there (c goes back to the
// pool), otherwise c becomes the last chunk.
func (q *recvQueue) add(c *[]byte, k int) {
	if l := q.last(); l != nil && len(*l.c)-l.end >= k {
		copy((*l.c)[l.end:], (*c)[:k])
		l.end += k
		q.n += k
		putChunk(c)
		return
	}
	q.chunks = append(q.chunks, qchunk{c: c, end: k})
	q.n += k
}

// take removes the first chunk from the queue and returns it with its
// unread bytes; the caller owns it then (putChunk). nil when empty.
func (q *recvQueue) take() (*[]byte, []byte) {
	if q.n == 0 {
		return nil, nil
	}
	f := q.chunks[0]
	p := (*f.c)[q.head:f.end]
	q.n -= len(p)
	q.drop()
	return f.c, p
}

// untake puts back at the head of the queue the part p of chunk c that
// take returned and its caller did not use.
func (q *recvQueue) untake(c *[]byte, p []byte) {
	start := cap(*c) - cap(p)
	q.chunks = append(q.chunks, qchunk{})
	copy(q.chunks[1:], q.chunks)
	q.chunks[0] = qchunk{c: c, end: start + len(p)}
	q.head = start
	q.n += len(p)
}

func (q *recvQueue) read(p []byte) int {
	total := 0
	for len(p) > 0 && q.n > 0 {
		f := q.chunks[0]
		n := copy(p, (*f.c)[q.head:f.end])
		q.head += n
		q.n -= n
		total += n
		p = p[n:]
		if q.head == f.end {
			putChunk(f.c)
			q.drop()
		}
	}
	return total
}

// keptChunks is how many chunk slots an empty queue keeps (64 bytes), so
// that a stream that receives a frame at a time does not allocate its
// slice each time; an empty queue that grew larger lets it go.
const keptChunks = 4

// drop removes the first chunk (the caller disposes of it).
func (q *recvQueue) drop() {
	n := copy(q.chunks, q.chunks[1:])
	q.chunks[n] = qchunk{}
	q.chunks = q.chunks[:n]
	q.head = 0
	if n == 0 && cap(q.chunks) > keptChunks {
		q.chunks = nil
	}
}

// reset drops everything queued and returns how many bytes it dropped.
func (q *recvQueue) reset() int {
	n := q.n
	for len(q.chunks) > 0 {
		putChunk(q.chunks[0].c)
		q.drop()
	}
	q.n = 0
	return n
}
