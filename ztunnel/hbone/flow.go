package hbone

import (
	"io"

	"golang.org/x/net/http2"
)

// Flow control: what the peer may still send (receive windows, given
// back as the stream's reader consumes) and what we may send (send
// windows, raised by the peer's WINDOW_UPDATE frames).

// readData reads a DATA frame whose header is fh and queues its payload
// for its stream's reader, within the connection's and the stream's
// receive windows; false ends the connection. The payload goes from the
// connection into the stream's chunks (small ones through the reader's
// scratch space), read without holding the connection's lock.
func (hc *h2conn) readData(fh http2.FrameHeader) bool {
	id := fh.StreamID
	n := int64(fh.Length) // what counts against the windows
	switch {
	case fh.Length > hc.t.MaxFrameSize:
		return hc.readError(http2.ErrFrameTooLarge)
	case id == 0:
		return hc.connError(http2.ErrCodeProtocol)
	}
	rest := int(fh.Length) // payload bytes not read yet
	data, pad := rest, 0
	if fh.Flags.Has(http2.FlagDataPadded) {
		if rest == 0 {
			return hc.readError(io.ErrUnexpectedEOF)
		}
		if _, err := io.ReadFull(hc.rd.r, hc.rd.small[:1]); err != nil {
			return hc.readError(err)
		}
		rest--
		pad = int(hc.rd.small[0])
		if pad > rest {
			return hc.connError(http2.ErrCodeProtocol)
		}
		data = rest - pad
	}
	end := fh.Flags.Has(http2.FlagDataEndStream)

	hc.mu.Lock()
	hc.connRecvWindow -= n
	if hc.connRecvWindow < 0 {
		hc.mu.Unlock()
		return hc.connError(http2.ErrCodeFlowControl)
	}
	st := hc.streams[id]
	switch {
	case st == nil || st.recvEOF || st.err != nil:
		// A stream we closed or refused: give the connection window back.
		known := hc.knownStreamLocked(id)
		hc.creditConnLocked(n)
		hc.mu.Unlock()
		if !known {
			return hc.connError(http2.ErrCodeProtocol)
		}
		return hc.discard(rest)
	case st.recvWindow < n:
		hc.creditConnLocked(n)
		hc.mu.Unlock()
		st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
		return hc.discard(rest)
	}
	st.recvWindow -= n
	if extra := n - int64(data); extra > 0 {
		// Padding counts against the windows but is never read.
		st.unacked += extra
		hc.grantLocked(st, extra)
	}
	hc.mu.Unlock()

	for data > 0 {
		// A large frame (a client's socket read) goes into one BufSize
		// buffer, which the push then writes to the socket with one
		// system call; smaller ones into a chunk.
		k := min(data, chunkSize)
		var c *[]byte
		p := hc.rd.small[:]
		switch {
		case data > chunkSize:
			c = GetBuf()
			p = *c
			k = min(data, len(p))
		case k > len(p):
			c = getChunk()
			p = *c
		}
		if _, err := io.ReadFull(hc.rd.r, p[:k]); err != nil {
			putChunk(c)
			return hc.readError(err)
		}
		hc.mu.Lock()
		switch {
		case st.err != nil:
			// Reset meanwhile: what arrives is dropped.
			hc.creditConnLocked(int64(k))
			putChunk(c)
		case c == nil:
			st.q.write(p[:k])
		default:
			st.q.add(c, k)
		}
		st.cond.Broadcast()
		step := st.pushStepLocked()
		hc.mu.Unlock()
		st.pushRun(step, false)
		data -= k
	}
	if pad > 0 && !hc.discard(pad) {
		return false
	}
	if end {
		hc.mu.Lock()
		var step pushStep
		if st.err == nil {
			st.recvEOF = true
			st.cond.Broadcast()
			hc.maybeRemoveLocked(st)
			step = st.pushStepLocked()
		}
		hc.mu.Unlock()
		st.pushRun(step, false)
	}
	if n == 0 && !end {
		return hc.noWork("empty DATA")
	}
	return true
}

// discard reads n payload bytes that go nowhere; false ends the
// connection.
func (hc *h2conn) discard(n int) bool {
	if err := hc.rd.discard(n); err != nil {
		return hc.readError(err)
	}
	return true
}

// knownStreamLocked reports whether id names a stream that was opened
// (and may have ended since): DATA for any other is a protocol error.
func (hc *h2conn) knownStreamLocked(id uint32) bool {
	if hc.srv != nil {
		return id <= hc.lastStreamID
	}
	return id < hc.cl.nextID
}

// processWindowUpdate adds a WINDOW_UPDATE's increment to the send
// window of the connection or of a stream; false ends the connection.
func (hc *h2conn) processWindowUpdate(f *http2.WindowUpdateFrame) bool {
	hc.mu.Lock()
	if f.StreamID == 0 {
		hc.connSendWindow += int64(f.Increment)
		if hc.connSendWindow > 1<<31-1 {
			hc.mu.Unlock()
			return hc.connError(http2.ErrCodeFlowControl)
		}
		hc.wcond.Signal()
	} else if st := hc.streams[f.StreamID]; st != nil {
		st.sendWindow += int64(f.Increment)
		if st.sendWindow > 1<<31-1 {
			hc.mu.Unlock()
			st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
			return true
		}
		hc.readyLocked(st)
	}
	hc.mu.Unlock()
	return true
}

// creditConnLocked records n bytes consumed on the connection and queues
// a connection WINDOW_UPDATE once a quarter of the window is consumed.
func (hc *h2conn) creditConnLocked(n int64) {
	hc.connUnacked += n
	if hc.connUnacked < int64(hc.t.ConnWindow)/4 {
		return
	}
	inc := hc.connUnacked
	hc.connUnacked = 0
	hc.connRecvWindow += inc
	hc.connWU += inc
	if !hc.connWUQueued {
		hc.connWUQueued = true
		hc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate})
	}
}

// grantLocked records n bytes of st consumed and queues the window
// updates that are due.
func (hc *h2conn) grantLocked(st *Stream, n int64) {
	hc.creditConnLocked(n)
	if st.recvEOF || st.err != nil {
		return
	}
	if st.unacked >= int64(hc.t.StreamWindow)/4 {
		inc := st.unacked
		st.unacked = 0
		st.recvWindow += inc
		st.wu += inc
		if !st.wuQueued {
			st.wuQueued = true
			hc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate, st: st})
		}
	}
}

// initialWindowLocked applies the peer's SETTINGS_INITIAL_WINDOW_SIZE to
// the send windows of the open streams.
func (hc *h2conn) initialWindowLocked(w int64) {
	delta := w - hc.peerInitWindow
	hc.peerInitWindow = w
	for _, st := range hc.streams {
		st.sendWindow += delta
		if delta > 0 {
			hc.readyLocked(st)
		}
	}
}
