package hbone

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// ctlKind is the kind of a queued control frame.
type ctlKind uint8

const (
	ctlSettings     ctlKind = iota // our SETTINGS and the connection window
	ctlSettingsAck                 //
	ctlPing                        // data (the client's keepalive)
	ctlPingAck                     // data
	ctlWindowUpdate                // st (nil: the connection); increment read at write time
	ctlRST                         // id, code
	ctlHeaders                     // id, status, end (a server's response)
	ctlRequest                     // st (a client's CONNECT)
	ctlGoAway                      // id (last stream), code
)

type ctlFrame struct {
	kind ctlKind
	end  bool
	peer bool // answers the peer: counts against maxPeerCtl
	code http2.ErrCode
	id   uint32
	val  uint32
	st   *Stream
	data [8]byte
}

// queueCtlLocked queues a control frame for the writer.
func (hc *h2conn) queueCtlLocked(f ctlFrame) {
	if hc.werr != nil {
		return
	}
	hc.ctl.push(f)
	hc.wcond.Signal()
}

// readyLocked puts st in the writer's round of streams if it has
// something to send.
func (hc *h2conn) readyLocked(st *Stream) {
	if st.inReady || st.err != nil || len(st.wbuf) == 0 && !st.wantEnd {
		return
	}
	st.inReady = true
	hc.ready.push(st)
	hc.wcond.Signal()
}

// writeLoop is the connection's only writer.
func (hc *h2conn) writeLoop() {
	defer close(hc.writerDone)
	hc.mu.Lock()
	for {
		if hc.werr != nil {
			break
		}
		if hc.wbusy {
			hc.wcond.Wait() // a handler writes directly
			continue
		}
		if f, ok := hc.ctl.pop(); ok {
			if f.peer {
				hc.peerCtl--
			}
			if !hc.prepareCtlLocked(&f) {
				continue
			}
			hc.wbusy = true
			hc.mu.Unlock()
			err := hc.writeCtl(&f)
			hc.mu.Lock()
			hc.wbusy = false
			if err != nil {
				hc.failWriteLocked(err)
				break
			}
			continue
		}
		if st, p, end := hc.nextDataLocked(); st != nil {
			hc.wbusy = true
			hc.mu.Unlock()
			err := hc.writeData(st.id, p, end)
			hc.mu.Lock()
			hc.wbusy = false
			st.writing = false
			st.cond.Broadcast()
			if err != nil {
				hc.failWriteLocked(err)
				break
			}
			hc.readyLocked(st)
			continue
		}
		if hc.fw.n > 0 || hc.fw.batching {
			hc.wbusy = true
			hc.mu.Unlock()
			err := hc.fw.push()
			hc.mu.Lock()
			hc.wbusy = false
			if err != nil {
				hc.failWriteLocked(err)
				break
			}
			continue
		}
		hc.fw.release()
		if hc.wclosing {
			break
		}
		hc.wcond.Wait()
	}
	closing := hc.wclosing && hc.werr == nil
	hc.mu.Unlock()
	if closing {
		hc.nc.Close()
	}
}

// directLocked lets a handler write its own frames when the writer has
// nothing queued and nobody writes: no goroutine switch on the common
// path of one busy stream. Only handlers do this, never the read loop,
// which must not wait for the network. On true the caller holds the
// write side until endDirectLocked.
func (hc *h2conn) directLocked() bool {
	if hc.wbusy || hc.werr != nil || hc.wclosing || hc.ctl.n > 0 || hc.ready.n > 0 {
		return false
	}
	hc.wbusy = true
	return true
}

// flushDirect ends a direct write: what is buffered goes out, and the
// buffer back to its pool.
func (hc *h2conn) flushDirect() error {
	err := hc.fw.push()
	hc.fw.release()
	return err
}

// endDirectLocked gives the write side back and wakes the writer if work
// was queued meanwhile.
func (hc *h2conn) endDirectLocked(err error) {
	hc.wbusy = false
	if err != nil {
		hc.failWriteLocked(err)
		return
	}
	if hc.ctl.n > 0 || hc.ready.n > 0 || hc.wclosing {
		hc.wcond.Signal()
	}
}

// prepareCtlLocked fills in what a control frame sends at write time;
// false drops it.
func (hc *h2conn) prepareCtlLocked(f *ctlFrame) bool {
	switch f.kind {
	case ctlWindowUpdate:
		if f.st == nil {
			f.val, hc.connWU, hc.connWUQueued = uint32(hc.connWU), 0, false
		} else {
			st := f.st
			f.id, f.val, st.wu, st.wuQueued = st.id, uint32(st.wu), 0, false
			if st.err != nil || st.recvEOF {
				return false
			}
		}
		return f.val > 0
	case ctlHeaders, ctlRequest:
		hc.wMaxFrame = hc.peerMaxFrame
		if hc.hencLimitSet {
			hc.henc.SetMaxDynamicTableSizeLimit(hc.hencLimit)
			hc.hencLimitSet = false
		}
	}
	return true
}

// writeCtl writes one control frame (writer only).
func (hc *h2conn) writeCtl(f *ctlFrame) error {
	fr := hc.wfr
	switch f.kind {
	case ctlSettings:
		var err error
		if hc.srv != nil {
			err = fr.WriteSettings(
				http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: hc.t.MaxConcurrentStreams},
				http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(hc.t.StreamWindow)},
				http2.Setting{ID: http2.SettingMaxFrameSize, Val: hc.t.MaxFrameSize},
				http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: hc.t.MaxHeaderListSize},
			)
		} else {
			err = fr.WriteSettings(
				http2.Setting{ID: http2.SettingEnablePush, Val: 0},
				http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(hc.t.StreamWindow)},
				http2.Setting{ID: http2.SettingMaxFrameSize, Val: hc.t.MaxFrameSize},
				http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: hc.t.MaxHeaderListSize},
			)
		}
		if err != nil {
			return err
		}
		if inc := int64(hc.t.ConnWindow) - 65535; inc > 0 {
			return fr.WriteWindowUpdate(0, uint32(inc))
		}
		return nil
	case ctlSettingsAck:
		return fr.WriteSettingsAck()
	case ctlPing:
		return fr.WritePing(false, f.data)
	case ctlPingAck:
		return fr.WritePing(true, f.data)
	case ctlWindowUpdate:
		return fr.WriteWindowUpdate(f.id, f.val)
	case ctlRST:
		return fr.WriteRSTStream(f.id, f.code)
	case ctlHeaders:
		hc.hbuf.Reset()
		_ = hc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusText(int(f.val))})
		return hc.writeHeaderBlock(f.id, f.end)
	case ctlRequest:
		hc.hbuf.Reset()
		st := f.st
		_ = hc.henc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
		_ = hc.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: st.Authority})
		if st.fwd.IsValid() {
			_ = hc.henc.WriteField(hpack.HeaderField{Name: "forwarded", Value: FormatForwarded(st.fwd)})
		}
		for k, vs := range st.Header {
			k = strings.ToLower(k)
			if k == "forwarded" && st.fwd.IsValid() || !httpguts.ValidHeaderFieldName(k) || hopByHop(k) {
				continue
			}
			for _, v := range vs {
				_ = hc.henc.WriteField(hpack.HeaderField{Name: k, Value: v})
			}
		}
		return hc.writeHeaderBlock(f.id, false)
	case ctlGoAway:
		return fr.WriteGoAway(f.id, f.code, nil)
	}
	return nil
}

// writeHeaderBlock writes the header block in hc.hbuf: one HEADERS frame,
// followed by CONTINUATION frames if the block is larger than the peer's
// frame size.
func (hc *h2conn) writeHeaderBlock(id uint32, end bool) error {
	block := hc.hbuf.Bytes()
	first := block[:min(len(block), hc.wMaxFrame)]
	block = block[len(first):]
	if err := hc.wfr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(block) == 0,
	}); err != nil {
		return err
	}
	for len(block) > 0 {
		frag := block[:min(len(block), hc.wMaxFrame)]
		block = block[len(frag):]
		if err := hc.wfr.WriteContinuation(id, len(block) == 0, frag); err != nil {
			return err
		}
	}
	return nil
}

// hopByHop reports whether a header field is connection-specific, which
// HTTP/2 forbids (RFC 9113, section 8.2.2).
func hopByHop(k string) bool {
	switch k {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te", "host":
		return true
	}
	return false
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
func (hc *h2conn) nextDataLocked() (*Stream, []byte, bool) {
	for range hc.ready.n {
		st, _ := hc.ready.pop()
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
		case hc.connSendWindow <= 0:
			// Everyone with data waits for the connection's window; only
			// END_STREAM can go.
			st.inReady = true
			hc.ready.push(st)
			continue
		}
		n := min(int64(len(st.wbuf)), st.sendWindow, hc.connSendWindow, int64(hc.peerMaxFrame))
		st.sendWindow -= n
		hc.connSendWindow -= n
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
func (hc *h2conn) writeData(id uint32, p []byte, end bool) error {
	h := hc.hdr[:]
	h[0], h[1], h[2] = byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
	h[3] = byte(http2.FrameData)
	h[4] = 0
	if end {
		h[4] = byte(http2.FlagDataEndStream)
	}
	h[5], h[6], h[7], h[8] = byte(id>>24)&0x7f, byte(id>>16), byte(id>>8), byte(id)
	if _, err := hc.fw.Write(h); err != nil {
		return err
	}
	_, err := hc.fw.Write(p)
	return err
}

// failWriteLocked records that the connection can no longer be written:
// it is closed, and every stream's pending Write fails.
func (hc *h2conn) failWriteLocked(err error) {
	if hc.werr == nil {
		hc.werr = fmt.Errorf("hbone: write: %w", err)
	}
	hc.closeConn()
	for _, st := range hc.streams {
		st.cond.Broadcast()
	}
	hc.wcond.Signal()
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
// back when the connection is idle. Over a batchConn (b), the records of
// a burst go out with one system call when the burst ends (push).
type frameWriter struct {
	w        io.Writer
	b        *batchConn // nil: records go out one by one
	batching bool       // b gathers since the first write of the burst
	buf      *[]byte
	n        int
}

// out writes p to the TLS connection.
func (fw *frameWriter) out(p []byte) (int, error) {
	if fw.b != nil && !fw.batching {
		fw.b.begin()
		fw.batching = true
	}
	return fw.w.Write(p)
}

// push ends a burst: what is buffered, and the records gathered under
// the TLS connection, go out.
func (fw *frameWriter) push() error {
	err := fw.flush()
	if fw.batching {
		fw.batching = false
		if berr := fw.b.end(); err == nil {
			err = berr
		}
	}
	return err
}

func (fw *frameWriter) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		if fw.n == 0 && len(p) >= wbufSize {
			k := len(p) - len(p)%wbufSize
			if _, err := fw.out(p[:k]); err != nil {
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
	_, err := fw.out((*fw.buf)[:fw.n])
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
