package ztunnel

import (
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
)

// How a proxied connection ends
//
// Only an orderly end of the peer's data becomes an orderly end on the
// other side: an application's FIN becomes END_STREAM, END_STREAM becomes
// a FIN. Anything else that ends a flow reaches every application that
// still has its socket open as a TCP reset, never as a FIN: a reset or a
// failed read or write on either TCP connection, an HBONE stream reset by
// the peer ztunnel, its HBONE connection closing under the stream (the
// peer ztunnel gone, a TLS error), the flow torn down (LiveFlow.Close,
// Deny, Close, Shutdown past its deadline), a refusal after the
// connection was accepted (policy, an unreachable destination), and the
// death of the ztunnel's process. Otherwise a close-delimited protocol
// takes truncated data for all of it.
//
// Every TCP socket the ztunnel proxies is therefore armed right after
// accept or dial (armReset): SO_LINGER on with a zero timeout, so that
// closing it sends RST, whether the ztunnel closes it or the kernel does
// because the process died. CloseWrite (shutdown(SHUT_WR)) still sends an
// orderly FIN, and only when both directions ended in order is the socket
// disarmed and closed the ordinary way (closeOrderly), which delivers
// what is still queued. An HBONE stream that must end abnormally is reset:
// with CONNECT_ERROR when the TCP connection it is spliced to broke (RFC
// 9113, section 8.5), CANCEL otherwise.

// lingerer is a socket whose close can be made a reset: *net.TCPConn, and
// types that embed one.
type lingerer interface{ SetLinger(sec int) error }

// armReset makes closing c send RST instead of FIN (SO_LINGER on, 0 s),
// also when the kernel closes it for a dead process. Sockets that cannot
// linger are left alone.
func armReset(c net.Conn) {
	if l, ok := c.(lingerer); ok {
		_ = l.SetLinger(0)
	}
}

// closeOrderly closes c after an orderly end of both directions: the FIN
// went out with CloseWrite, and the kernel's default close still delivers
// what is queued.
func closeOrderly(c io.Closer) {
	if l, ok := c.(lingerer); ok {
		_ = l.SetLinger(-1)
	}
	_ = c.Close()
}

// closeReset closes c with a reset (RST), dropping what is queued either
// way; it arms c again in case c was never armed.
func closeReset(c io.Closer) {
	if l, ok := c.(lingerer); ok {
		_ = l.SetLinger(0)
	}
	_ = c.Close()
}

// endError is the error of a flow that one of its ends broke: reading or
// writing it failed, or the peer ztunnel reset or lost the stream. flag
// names that end.
type endError struct {
	flag ResponseFlag
	err  error
}

func (e *endError) Error() string { return e.err.Error() }
func (e *endError) Unwrap() error { return e.err }

// downstreamBroke is the error of a client's TCP connection that failed.
func downstreamBroke(err error) error {
	return &endError{FlagDownstreamReset, fmt.Errorf("ztunnel: client connection: %w", err)}
}

// upstreamBroke is the error of a destination's TCP connection that
// failed.
func upstreamBroke(err error) error {
	return &endError{FlagUpstreamReset, fmt.Errorf("ztunnel: destination connection: %w", err)}
}

// tunnelBroke is the error of an HBONE stream that failed: reset by the
// peer ztunnel, or its connection lost. A reset with CONNECT_ERROR says
// that the peer's TCP connection broke: the destination's when this is
// the source (atSource), the client's otherwise.
func tunnelBroke(err error, atSource bool) error {
	var (
		code  http2.ErrCode
		reset bool
		re    *hbone.ResetError
	)
	if errors.As(err, &re) {
		code, reset = re.Code, true
	}
	flag := FlagTunnelLost
	switch {
	case reset && code == http2.ErrCodeConnect && atSource:
		flag = FlagUpstreamReset
	case reset && code == http2.ErrCodeConnect:
		flag = FlagDownstreamReset
	case reset:
		flag = FlagTunnelReset
	}
	return &endError{flag, fmt.Errorf("ztunnel: HBONE stream: %w", err)}
}

// ended records in rec how an admitted flow ended: err nil for an orderly
// end; an *endError names the end that broke; any other error is the end
// of the flow's context: LiveFlow's Close or Deny, whose flag untrack
// records. A flow that breaks while the ztunnel closes is recorded as
// FlagShutdown: Close cancels the flows and closes the HBONE connections
// at once, and whichever the flow noticed first, the closing cut it.
func (p *Proxy) ended(rec *FlowRecord, err error) {
	rec.Err = err
	switch {
	case err == nil:
	case p.ctx.Err() != nil:
		rec.Flag = FlagShutdown
	default:
		rec.Flag = FlagClosed
		if ee := (*endError)(nil); errors.As(err, &ee) {
			rec.Flag = ee.flag
		}
	}
}
