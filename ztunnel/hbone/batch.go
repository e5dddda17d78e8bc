package hbone

import (
	"net"
	"sync"
)

// Batching TLS records: crypto/tls writes every record (at most 16 KiB of
// plaintext) with its own write to the connection under it, so a 64 KiB
// burst costs four system calls, four TCP sends and up to four wake-ups
// of the reader. A batchConn under the TLS connection gathers the records
// of one burst of the connection's writer and writes them at once when
// the burst ends: when the writer has nothing more queued, or at the end
// of a stream's own write. A lone small write is never held back: its
// burst ends right after it.

// BatchWrites wraps the TCP connection c that a TLS connection given to
// Server.ServeConn will run on, so that the server writes the TLS records
// of one burst of frames with one system call. Without it the server
// works the same, one system call per record.
func BatchWrites(c net.Conn) net.Conn { return &batchConn{Conn: c} }

// batchSize is what a batch gathers at most: a 64 KiB copy buffer's worth
// of full TLS 1.3 records (16 KiB of data, 22 bytes of header, type and
// tag) and the frame headers in them.
const batchSize = 4*(16<<10+22) + 512

var batchPool = sync.Pool{New: func() any { b := make([]byte, batchSize); return &b }}

// batchConn gathers writes between begin and end; outside a batch it
// writes through. Its buffer is pooled and held only during a batch.
type batchConn struct {
	net.Conn
	mu  sync.Mutex
	on  bool
	buf *[]byte
	n   int
	err error // a failed flush: every later write fails with it
}

// begin starts a batch.
func (b *batchConn) begin() {
	b.mu.Lock()
	b.on = true
	b.mu.Unlock()
}

// end ends a batch and writes what it gathered.
func (b *batchConn) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.on = false
	err := b.flushLocked()
	if b.buf != nil {
		batchPool.Put(b.buf)
		b.buf = nil
	}
	return err
}

func (b *batchConn) flushLocked() error {
	if b.err != nil {
		return b.err
	}
	if b.n == 0 {
		return nil
	}
	_, err := b.Conn.Write((*b.buf)[:b.n])
	b.n = 0
	if err != nil {
		b.err = err
	}
	return err
}

// Write gathers p during a batch, otherwise writes it. Writes of the TLS
// connection are whole records, and come in order: crypto/tls writes one
// record at a time under its own lock.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if !b.on {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		return b.Conn.Write(p)
	}
	if b.n+len(p) > batchSize {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) > batchSize {
		n, err := b.Conn.Write(p)
		if err != nil {
			b.err = err
		}
		return n, err
	}
	if b.buf == nil {
		b.buf = batchPool.Get().(*[]byte)
	}
	b.n += copy((*b.buf)[b.n:], p)
	return len(p), nil
}
