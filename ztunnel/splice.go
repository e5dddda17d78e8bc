package ztunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// halfConn is a byte stream that can half-close: net.TCPConn and
// hbone.Stream.
type halfConn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// splice copies a→b and b→a until both directions ended. EOF on one side
// half-closes the other (CloseWrite); an error on either side, or ctx's
// end, closes both. It adds the bytes to abN and baN as they move, and
// returns the bytes copied each way and the first error other than EOF.
func splice(ctx context.Context, a, b halfConn, abN, baN *atomic.Int64) (ab, ba int64, err error) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, abort)
	defer stop()
	errc := make(chan error, 1)
	go func() {
		var err error
		ab, err = copyHalf(b, a, abN)
		if err != nil {
			abort()
		}
		errc <- err
	}()
	ba, err = copyHalf(a, b, baN)
	if err != nil {
		abort()
	}
	if e := <-errc; err == nil {
		err = e
	}
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return ab, ba, err
}

// copyHalf copies src to dst, counting into n, and half-closes dst at
// src's EOF.
func copyHalf(dst, src halfConn, n *atomic.Int64) (int64, error) {
	written, err := copyCounted(dst, src, n)
	if err != nil {
		return written, err
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return written, err
	}
	return written, nil
}

// copyCounted copies src to dst through a pooled buffer until src's EOF,
// adding every chunk written to n so that readers of the open-flow
// registry see the bytes move. (Kernel splicing between two TCP sockets
// would be cheaper but gives no count until it returns.)
func copyCounted(dst io.Writer, src io.Reader, n *atomic.Int64) (int64, error) {
	buf := hbone.GetBuf()
	defer hbone.PutBuf(buf)
	b := *buf
	var written int64
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
				return written, werr
			}
			if nw != nr {
				return written, io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return written, nil
			}
			return written, rerr
		}
	}
}
