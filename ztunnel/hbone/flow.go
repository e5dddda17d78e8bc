package hbone

import "golang.org/x/net/http2"

// Flow control: what the client may still send (receive windows, given
// back as the stream's reader consumes) and what we may send (send
// windows, raised by the client's WINDOW_UPDATE frames).

// processData queues a DATA frame's payload for its stream's reader,
// within the connection's and the stream's receive windows; false ends
// the connection.
func (sc *serverConn) processData(f *http2.DataFrame) bool {
	id := f.StreamID
	n := int64(f.Length)
	data := f.Data()
	sc.mu.Lock()
	sc.connRecvWindow -= n
	if sc.connRecvWindow < 0 {
		sc.mu.Unlock()
		return sc.connError(http2.ErrCodeFlowControl)
	}
	st := sc.streams[id]
	if st == nil || st.recvEOF || st.err != nil {
		// A stream we closed or refused: give the connection window back.
		known := id <= sc.lastStreamID
		sc.creditConnLocked(n)
		sc.mu.Unlock()
		if !known {
			return sc.connError(http2.ErrCodeProtocol)
		}
		return true
	}
	st.recvWindow -= n
	if st.recvWindow < 0 {
		sc.mu.Unlock()
		st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
		return true
	}
	st.q.write(data)
	if pad := n - int64(len(data)); pad > 0 {
		st.unacked += pad
		sc.grantLocked(st, pad)
	}
	if f.StreamEnded() {
		st.recvEOF = true
	}
	st.cond.Broadcast()
	sc.mu.Unlock()
	if n == 0 && !f.StreamEnded() {
		return sc.noWork("empty DATA")
	}
	return true
}

// processWindowUpdate adds a WINDOW_UPDATE's increment to the send
// window of the connection or of a stream; false ends the connection.
func (sc *serverConn) processWindowUpdate(f *http2.WindowUpdateFrame) bool {
	sc.mu.Lock()
	if f.StreamID == 0 {
		sc.connSendWindow += int64(f.Increment)
		if sc.connSendWindow > 1<<31-1 {
			sc.mu.Unlock()
			return sc.connError(http2.ErrCodeFlowControl)
		}
		sc.wcond.Signal()
	} else if st := sc.streams[f.StreamID]; st != nil {
		st.sendWindow += int64(f.Increment)
		if st.sendWindow > 1<<31-1 {
			sc.mu.Unlock()
			st.abort(http2.ErrCodeFlowControl, ErrStreamClosed)
			return true
		}
		sc.readyLocked(st)
	}
	sc.mu.Unlock()
	return true
}

// creditConnLocked records n bytes consumed on the connection and queues
// a connection WINDOW_UPDATE once a quarter of the window is consumed.
func (sc *serverConn) creditConnLocked(n int64) {
	sc.connUnacked += n
	if sc.connUnacked < int64(sc.t.ConnWindow)/4 {
		return
	}
	inc := sc.connUnacked
	sc.connUnacked = 0
	sc.connRecvWindow += inc
	sc.connWU += inc
	if !sc.connWUQueued {
		sc.connWUQueued = true
		sc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate})
	}
}

// grantLocked records n bytes of st consumed and queues the window
// updates that are due.
func (sc *serverConn) grantLocked(st *Stream, n int64) {
	sc.creditConnLocked(n)
	if st.recvEOF || st.err != nil {
		return
	}
	if st.unacked >= int64(sc.t.StreamWindow)/4 {
		inc := st.unacked
		st.unacked = 0
		st.recvWindow += inc
		st.wu += inc
		if !st.wuQueued {
			st.wuQueued = true
			sc.queueCtlLocked(ctlFrame{kind: ctlWindowUpdate, st: st})
		}
	}
}
