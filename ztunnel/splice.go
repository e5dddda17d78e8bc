package ztunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"

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
// end, closes both. It returns the bytes copied each way and the first
// error other than EOF.
func splice(ctx context.Context, a, b halfConn) (ab, ba int64, err error) {
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
		ab, err = copyHalf(b, a)
		if err != nil {
			abort()
		}
		errc <- err
	}()
	ba, err = copyHalf(a, b)
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

// copyHalf copies src to dst and half-closes dst at src's EOF. Between two
// TCP sockets the kernel splices; otherwise a pooled buffer is used.
func copyHalf(dst, src halfConn) (int64, error) {
	var n int64
	var err error
	d, dok := dst.(*net.TCPConn)
	s, sok := src.(*net.TCPConn)
	if dok && sok {
		n, err = d.ReadFrom(s)
	} else {
		buf := hbone.GetBuf()
		n, err = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *buf)
		hbone.PutBuf(buf)
	}
	if err != nil {
		return n, err
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, err
	}
	return n, nil
}

// writerOnly and readerOnly hide ReadFrom/WriteTo so io.CopyBuffer uses
// the pooled buffer instead of allocating one.
type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }
