package hbone

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// ctlKind is the kind of a queued control frame.
type ctlKind uint8

const (
	ctlSettings     ctlKind = iota // our SETTINGS and the connection window
	ctlSettingsAck                 //
	ctlPingAck                     // data
	ctlWindowUpdate                // st (nil: the connection); increment read at write time
	ctlRST                         // id, code
	ctlHeaders                     // id, status, end
	ctlGoAway                      // id (last stream), code
)

type ctlFrame struct {
	kind ctlKind
	end  bool
	peer bool // answers the client: counts against maxPeerCtl
	code http2.ErrCode
	id   uint32
	val  uint32
	st   *Stream
	data [8]byte
}

// queueCtlLocked queues a control frame for the writer.
func (sc *serverConn) queueCtlLocked(f ctlFrame) {
	if sc.werr != nil {
		return
	}
	sc.ctl.push(f)
	sc.wcond.Signal()
}

// readyLocked puts st in the writer's round of streams if it has
// something to send.
func (sc *serverConn) readyLocked(st *Stream) {
	if st.inReady || st.err != nil || len(st.wbuf) == 0 && !st.wantEnd {
		return
	}
	st.inReady = true
	sc.ready.push(st)
	sc.wcond.Signal()
}

// writeLoop is the connection's only writer.
func (sc *serverConn) writeLoop() {
	defer close(sc.writerDone)
	sc.mu.Lock()
	for {
		if sc.werr != nil {
			break
		}
		if sc.wbusy {
			sc.wcond.Wait() // a handler writes directly
			continue
		}
		if f, ok := sc.ctl.pop(); ok {
			if f.peer {
				sc.peerCtl--
			}
			if !sc.prepareCtlLocked(&f) {
				continue
			}
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.writeCtl(&f)
			sc.mu.Lock()
			sc.wbusy = false
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			continue
		}
		if st, p, end := sc.nextDataLocked(); st != nil {
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.writeData(st.id, p, end)
			sc.mu.Lock()
			sc.wbusy = false
			st.writing = false
			st.cond.Broadcast()
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			sc.readyLocked(st)
			continue
		}
		if sc.fw.n > 0 {
			sc.wbusy = true
			sc.mu.Unlock()
			err := sc.fw.flush()
			sc.mu.Lock()
			sc.wbusy = false
			if err != nil {
				sc.failWriteLocked(err)
				break
			}
			continue
		}
		sc.fw.release()
		if sc.wclosing {
			break
		}
		sc.wcond.Wait()
	}
	closing := sc.wclosing && sc.werr == nil
	sc.mu.Unlock()
	if closing {
		sc.nc.Close()
	}
}

// directLocked lets a handler write its own frames when the writer has
// nothing queued and nobody writes: no goroutine switch on the common
// path of one busy stream. Only handlers do this, never the read loop,
// which must not wait for the network. On true the caller holds the
// write side until endDirectLocked.
func (sc *serverConn) directLocked() bool {
	if sc.wbusy || sc.werr != nil || sc.wclosing || sc.ctl.n > 0 || sc.ready.n > 0 {
		return false
	}
	sc.wbusy = true
	return true
}

// flushDirect ends a direct write: what is buffered goes out, and the
// buffer back to its pool.
func (sc *serverConn) flushDirect() error {
	err := sc.fw.flush()
	sc.fw.release()
	return err
}

// endDirectLocked gives the write side back and wakes the writer if work
// was queued meanwhile.
func (sc *serverConn) endDirectLocked(err error) {
	sc.wbusy = false
	if err != nil {
		sc.failWriteLocked(err)
		return
	}
	if sc.ctl.n > 0 || sc.ready.n > 0 || sc.wclosing {
		sc.wcond.Signal()
	}
}

// prepareCtlLocked fills in what a control frame sends at write time;
// false drops it.
func (sc *serverConn) prepareCtlLocked(f *ctlFrame) bool {
	switch f.kind {
	case ctlWindowUpdate:
		if f.st == nil {
			f.val, sc.connWU, sc.connWUQueued = uint32(sc.connWU), 0, false
		} else {
			st := f.st
			f.id, f.val, st.wu, st.wuQueued = st.id, uint32(st.wu), 0, false
			if st.err != nil || st.recvEOF {
				return false
			}
		}
		return f.val > 0
	case ctlHeaders:
		if sc.hencLimitSet {
			sc.henc.SetMaxDynamicTableSizeLimit(sc.hencLimit)
			sc.hencLimitSet = false
		}
	}
	return true
}

// writeCtl writes one control frame (writer only).
func (sc *serverConn) writeCtl(f *ctlFrame) error {
	fr := sc.fr
	switch f.kind {
	case ctlSettings:
		if err := fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.t.MaxConcurrentStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(sc.t.StreamWindow)},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: sc.t.MaxFrameSize},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: sc.t.MaxHeaderListSize},
		); err != nil {
			return err
		}
		if inc := int64(sc.t.ConnWindow) - 65535; inc > 0 {
			return fr.WriteWindowUpdate(0, uint32(inc))
		}
		return nil
	case ctlSettingsAck:
		return fr.WriteSettingsAck()
	case ctlPingAck:
		return fr.WritePing(true, f.data)
	case ctlWindowUpdate:
		return fr.WriteWindowUpdate(f.id, f.val)
	case ctlRST:
		return fr.WriteRSTStream(f.id, f.code)
	case ctlHeaders:
		sc.hbuf.Reset()
		_ = sc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusText(int(f.val))})
		return fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID: f.id, BlockFragment: sc.hbuf.Bytes(), EndStream: f.end, EndHeaders: true,
		})
	case ctlGoAway:
		return fr.WriteGoAway(f.id, f.code, nil)
	}
	return nil
}

func statusText(status int) string {
	switch status {
	case http.StatusOK:
		return "200"
	case http.StatusBadRequest:
		return "400"
	case http.StatusUnauthorized:
		return "401"
	case http.StatusServiceUnavailable:
		return "503"
	}
	return strconv.Itoa(status)
}

// nextDataLocked takes the next DATA frame to send: the first ready
// stream that may send (its window and the connection's), its payload
// (a slice of its Write's buffer, marked as being written) and whether
// END_STREAM goes with it. Streams waiting for their own window leave the
// round until a WINDOW_UPDATE puts them back.
func (sc *serverConn) nextDataLocked() (*Stream, []byte, bool) {
	for range sc.ready.n {
		st, _ := sc.ready.pop()
		st.inReady = false
		switch {
		case st.err != nil:
			continue
		case len(st.wbuf) == 0:
			if !st.wantEnd {
				continue
			}
			st.wantEnd = false
			st.writing = true
			return st, nil, true
		case st.sendWindow <= 0:
			continue
		case sc.connSendWindow <= 0:
			// Everyone with data waits for the connection's window; only
			// END_STREAM can go.
			st.inReady = true
			sc.ready.push(st)
			continue
		}
		n := min(int64(len(st.wbuf)), st.sendWindow, sc.connSendWindow, int64(sc.peerMaxFrame))
		st.sendWindow -= n
		sc.connSendWindow -= n
		p := st.wbuf[:n]
		st.wbuf = st.wbuf[n:]
		st.writing = true
		end := len(st.wbuf) == 0 && st.wantEnd
		if end {
			st.wantEnd = false
		}
		return st, p, end
	}
	return nil, nil, false
}

// writeData writes one DATA frame (writer only); the payload goes to the
// TLS connection without an intermediate copy when it is large.
func (sc *serverConn) writeData(id uint32, p []byte, end bool) error {
	h := sc.hdr[:]
	h[0], h[1], h[2] = byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
	h[3] = byte(http2.FrameData)
	h[4] = 0
	if end {
		h[4] = byte(http2.FlagDataEndStream)
	}
	h[5], h[6], h[7], h[8] = byte(id>>24)&0x7f, byte(id>>16), byte(id>>8), byte(id)
	if _, err := sc.fw.Write(h); err != nil {
		return err
	}
	_, err := sc.fw.Write(p)
	return err
}

// failWriteLocked records that the connection can no longer be written:
// it is closed, and every stream's pending Write fails.
func (sc *serverConn) failWriteLocked(err error) {
	if sc.werr == nil {
		sc.werr = fmt.Errorf("hbone: write: %w", err)
	}
	sc.nc.Close()
	for _, st := range sc.streams {
		st.cond.Broadcast()
	}
	sc.wcond.Signal()
}

// ring is a FIFO that grows as needed; it keeps up to 64 slots when empty.
type ring[T any] struct {
	buf  []T
	head int
	n    int
}

func (r *ring[T]) push(v T) {
	if r.n == len(r.buf) {
		nb := make([]T, max(8, 2*len(r.buf)))
		for i := range r.n {
			nb[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = nb, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = v
	r.n++
}

func (r *ring[T]) pop() (T, bool) {
	var zero T
	if r.n == 0 {
		return zero, false
	}
	v := r.buf[r.head]
	r.buf[r.head] = zero
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	if r.n == 0 && len(r.buf) > 64 {
		r.buf, r.head = nil, 0 // a burst is over: do not keep its storage
	}
	return v, true
}

// wbufSize is the writer's buffer: one TLS record's worth of plaintext.
const wbufSize = 16 << 10

var wbufPool = sync.Pool{New: func() any { b := make([]byte, wbufSize); return &b }}

// frameWriter buffers small frames into full TLS records and passes large
// payloads through in whole records, so TLS writes are few and full. Its
// buffer comes from a pool while there is something to write and goes
// back when the connection is idle.
type frameWriter struct {
	w   io.Writer
	buf *[]byte
	n   int
}

func (fw *frameWriter) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		if fw.n == 0 && len(p) >= wbufSize {
			k := len(p) - len(p)%wbufSize
			if _, err := fw.w.Write(p[:k]); err != nil {
				return total - len(p), err
			}
			p = p[k:]
			continue
		}
		if fw.buf == nil {
			fw.buf = wbufPool.Get().(*[]byte)
		}
		c := copy((*fw.buf)[fw.n:], p)
		fw.n += c
		p = p[c:]
		if fw.n == wbufSize {
			if err := fw.flush(); err != nil {
				return total - len(p), err
			}
		}
	}
	return total, nil
}

func (fw *frameWriter) flush() error {
	if fw.n == 0 {
		return nil
	}
	_, err := fw.w.Write((*fw.buf)[:fw.n])
	fw.n = 0
	return err
}

// release gives the buffer back to the pool (nothing must be buffered).
func (fw *frameWriter) release() {
	if fw.buf != nil && fw.n == 0 {
		wbufPool.Put(fw.buf)
		fw.buf = nil
	}
}
