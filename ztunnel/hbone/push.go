package hbone

// Pushing a stream's data to a sink (Stream.PushTo): the connection's
// read loop writes what arrives to the sink without waiting, so that no
// goroutine needs to wait for an idle stream's next bytes. Only when the
// sink is full does the stream start a goroutine that waits for it,
// which ends once the queue is empty again.

// A Sink takes what a stream receives (Stream.PushTo): a socket, usually.
type Sink interface {
	// TryWrite writes what it can of p at once and never waits: n <
	// len(p) with a nil error means that the sink is full for now. It is
	// called from the connection's read loop.
	TryWrite(p []byte) (n int, err error)
	// Write writes all of p, waiting as long as it takes. It is called
	// by a goroutine of the stream while the sink is full.
	Write(p []byte) (n int, err error)
}

// PushTo makes the stream deliver what it receives to sink, in order, as
// it arrives, instead of to Read or WriteTo (which must not be used
// then). done is called once delivery ended: with nil after the peer's
// END_STREAM, everything before it delivered; with the sink's error; or
// with the error Read would return (a *ResetError, ErrStreamClosed).
// done runs on the connection's read loop, on the stream's goroutine or
// on PushTo's caller, never with a lock of the stream held; it must not
// wait. The windows are given back as the sink takes the bytes, so a
// full sink holds back at most the stream's window.
func (st *Stream) PushTo(sink Sink, done func(error)) {
	hc := st.hc
	hc.mu.Lock()
	st.push, st.pushDone = sink, done
	step := st.pushStepLocked()
	hc.mu.Unlock()
	st.pushRun(step, false)
}

// pushStep is what a change of a pushing stream's state asks for; the
// caller does it once it released the connection's lock (pushRun).
type pushStep uint8

const (
	pushNothing pushStep = iota
	pushWrite            // write what is queued (the caller holds pushBusy)
	pushEnd              // call done
)

// pushStepLocked returns what a pushing stream must do after its queue or
// state changed.
func (st *Stream) pushStepLocked() pushStep {
	switch {
	case st.push == nil || st.pushBusy || st.pushEnded:
		return pushNothing
	case st.q.n > 0:
		st.pushBusy = true
		return pushWrite
	case st.err != nil || st.recvEOF:
		st.pushEnded = true
		return pushEnd
	}
	return pushNothing
}

// pushRun does step; wait says whether the caller may wait for the sink
// (a goroutine of the stream) or not (the read loop, a user of the
// stream).
func (st *Stream) pushRun(step pushStep, wait bool) {
	switch step {
	case pushWrite:
		st.pushOut(wait)
	case pushEnd:
		st.pushDone(st.pushErr())
	}
}

// pushErr is the error done gets at the end: nil after END_STREAM.
func (st *Stream) pushErr() error {
	st.hc.mu.Lock()
	defer st.hc.mu.Unlock()
	if st.pushFail != nil {
		return st.pushFail
	}
	return st.err
}

// pushOut writes the queued chunks to the sink; the caller holds
// pushBusy. Without wait, a full sink hands the rest over to a goroutine.
func (st *Stream) pushOut(wait bool) {
	hc := st.hc
	for {
		hc.mu.Lock()
		c, p := st.q.take()
		if c == nil {
			st.pushBusy = false
			step := st.pushStepLocked()
			hc.mu.Unlock()
			st.pushRun(step, wait)
			return
		}
		hc.mu.Unlock()
		var (
			n   int
			err error
		)
		if wait {
			n, err = st.push.Write(p)
		} else {
			n, err = st.push.TryWrite(p)
		}
		n = max(0, min(n, len(p)))
		hc.mu.Lock()
		st.unacked += int64(n)
		hc.grantLocked(st, int64(n))
		switch {
		case err != nil:
			// The sink failed: what it did not take is dropped, and the
			// stream's user hears of it through done (and resets it).
			putChunk(c)
			hc.creditConnLocked(int64(len(p) - n))
			hc.creditConnLocked(int64(st.q.reset()))
			st.pushFail = err
			st.pushBusy, st.pushEnded = false, true
			hc.mu.Unlock()
			st.pushDone(err)
			return
		case n < len(p) && st.err == nil:
			st.q.untake(c, p[n:])
			hc.mu.Unlock()
			if !wait {
				go st.pushOut(true)
				return
			}
			continue
		case n < len(p):
			// Reset meanwhile: the rest goes nowhere.
			hc.creditConnLocked(int64(len(p) - n))
		}
		putChunk(c)
		hc.mu.Unlock()
	}
}
