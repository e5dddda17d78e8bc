package ztunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// halfConn is a byte stream that can half-close: net.TCPConn and
// hbone.Stream.
type halfConn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// splice copies a→b and b→a until both directions ended, then closes a
// and b. a is the flow's downstream end (the client's connection, or the
// HBONE stream at the destination), b its upstream end (the connection
// the ztunnel dialled).
//
// The EOF of one end half-closes the other (CloseWrite: FIN or
// END_STREAM); when both directions ended so, a and b are closed in order
// (closeOrderly). Anything else aborts the splice at once and resets both
// ends, so that neither application takes the break for an end of data:
// an error reading or writing either end, or ctx's end. A TCP end is
// closed with RST; a stream end is reset with CONNECT_ERROR when b broke
// (RFC 9113, section 8.5), CANCEL otherwise.
//
// It returns the bytes copied each way and the abort's cause: nil after an
// orderly end, an *endError naming the end that broke, or ctx's error.
func splice(ctx context.Context, a, b halfConn, abN, baN *atomic.Int64) (ab, ba int64, err error) {
	sp := &splicer{ctx: ctx, a: a, b: b}
	stop := context.AfterFunc(ctx, sp.abortCtx)
	sp.wg.Add(1)
	go func() {
		defer sp.wg.Done()
		var srcBroke bool
		var err error
		if sp.ab, srcBroke, err = copyHalf(b, a, abN); err != nil {
			if srcBroke {
				sp.abort(endBroke(a, false, err))
			} else {
				sp.abort(endBroke(b, true, err))
			}
		}
	}()
	ba, srcBroke, err := copyHalf(a, b, baN)
	if err != nil {
		if srcBroke {
			sp.abort(endBroke(b, true, err))
		} else {
			sp.abort(endBroke(a, false, err))
		}
	}
	sp.wg.Wait()
	if !stop() {
		sp.once.Do(func() {}) // wait for the abort ctx started
	}
	if sp.cause == nil {
		closeOrderly(a)
		closeOrderly(b)
	}
	return sp.ab, ba, sp.cause
}

// splicer is what the two directions of a splice share (one allocation).
type splicer struct {
	ctx   context.Context
	a, b  halfConn
	ab    int64 // bytes copied a→b
	wg    sync.WaitGroup
	once  sync.Once
	cause error // set by the first abort
}

// abort resets both ends, once; err is why.
func (sp *splicer) abort(err error) {
	sp.once.Do(func() {
		sp.cause = err
		resetEnd(sp.a, err)
		resetEnd(sp.b, err)
	})
}

func (sp *splicer) abortCtx() { sp.abort(sp.ctx.Err()) }

// endBroke is the error of end c of a splice, upstream or not, failing
// with err.
func endBroke(c halfConn, upstream bool, err error) error {
	switch {
	case upstream:
		return upstreamBroke(err)
	case isStream(c):
		return tunnelBroke(err, false)
	}
	return downstreamBroke(err)
}

func isStream(c halfConn) bool {
	_, ok := c.(*hbone.Stream)
	return ok
}

// resetEnd ends c abnormally, cause being why.
func resetEnd(c halfConn, cause error) {
	s, ok := c.(*hbone.Stream)
	if !ok {
		closeReset(c)
		return
	}
	var ee *endError
	if errors.As(cause, &ee) && ee.flag == FlagUpstreamReset {
		s.Reset(http2.ErrCodeConnect)
		return
	}
	s.Reset(http2.ErrCodeCancel)
}

// copyHalf copies src to dst, counting into n, and half-closes dst at
// src's EOF. On failure srcBroke says whether reading src or writing (or
// half-closing) dst failed.
func copyHalf(dst, src halfConn, n *atomic.Int64) (written int64, srcBroke bool, err error) {
	if written, srcBroke, err = copyCounted(dst, src, n); err != nil {
		return written, srcBroke, err
	}
	return written, false, dst.CloseWrite()
}

// copyCounted copies src to dst through a pooled buffer until src's EOF,
// adding every chunk written to n so that readers of the open-flow
// registry see the bytes move. (Kernel splicing between two TCP sockets
// would be cheaper but gives no count until it returns.) On failure
// srcBroke says whether reading src or writing dst failed.
func copyCounted(dst io.Writer, src io.Reader, n *atomic.Int64) (written int64, srcBroke bool, err error) {
	buf := hbone.GetBuf()
	defer hbone.PutBuf(buf)
	b := *buf
	for {
		nr, rerr := src.Read(b)
		if nr > 0 {
			nw, werr := dst.Write(b[:nr])
			if nw < 0 || nw > nr {
				nw, werr = 0, errors.New("ztunnel: invalid write count")
			}
			written += int64(nw)
			n.Add(int64(nw))
			if werr != nil {
				return written, false, werr
			}
			if nw != nr {
				return written, false, io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return written, false, nil
			}
			return written, true, rerr
		}
	}
}
