package ztunnel

import (
	"errors"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// ResponseFlag says why a connection was refused or ended badly. The set
// is closed; String gives the name used as the response_flags metric label
// and in access logs ("-" for none).
type ResponseFlag uint8

// The response flags.
const (
	// FlagNone: the flow ran normally.
	FlagNone ResponseFlag = iota
	// FlagUnknownSource: an outbound connection from an address that no
	// workload of this node owns.
	FlagUnknownSource
	// FlagLoop: the original destination is one of the ztunnel's own
	// ports; serving it would make the ztunnel dial itself.
	FlagLoop
	// FlagNoSVID: the ztunnel could not get the certificate of an
	// identity it must present.
	FlagNoSVID
	// FlagNoLocalWorkload: an HBONE connection or CONNECT addressed to an
	// IP that no enrolled workload of this node owns.
	FlagNoLocalWorkload
	// FlagTLSNoClientCert: an HBONE client presented no certificate.
	FlagTLSNoClientCert
	// FlagTLSUntrustedDomain: the peer's SPIFFE ID is in a trust domain
	// without a trusted bundle.
	FlagTLSUntrustedDomain
	// FlagTLSUnknownCA: the peer's chain leads to no trusted root.
	FlagTLSUnknownCA
	// FlagTLSExpired: the peer's certificate is expired or not yet valid.
	FlagTLSExpired
	// FlagTLSPeerMismatch: the HBONE server is not the destination
	// workload's identity.
	FlagTLSPeerMismatch
	// FlagTLSBadCert: the peer's certificate is not an X509-SVID.
	FlagTLSBadCert
	// FlagTLSHandshake: the TLS handshake failed otherwise (protocol
	// version, ALPN, timeout, reset).
	FlagTLSHandshake
	// FlagHTTP1: an HTTP/1 request on the HBONE port.
	FlagHTTP1
	// FlagNotConnect: an HTTP/2 request with a method other than CONNECT.
	FlagNotConnect
	// FlagHeadersTooLarge: request headers beyond the limit.
	FlagHeadersTooLarge
	// FlagMalformed: a CONNECT the server cannot parse (target, pseudo
	// headers).
	FlagMalformed
	// FlagRelayRefused: a CONNECT target other than the pod the HBONE
	// connection was addressed to.
	FlagRelayRefused
	// FlagForwardedSpoofed: a Forwarded header claimed a source IP of
	// another identity; the claim was ignored and the TLS peer's address
	// used. The flow itself goes on.
	FlagForwardedSpoofed
	// FlagPolicyDenied: the Authorizer denied the flow.
	FlagPolicyDenied
	// FlagStreamLimit: no stream slot left (pool or server limit).
	FlagStreamLimit
	// FlagConnectFailed: the destination refused or could not be reached.
	FlagConnectFailed
	// FlagConnectTimeout: connecting to the destination timed out.
	FlagConnectTimeout
	// FlagHBONEConnectFailed: the destination node's ztunnel could not be
	// reached.
	FlagHBONEConnectFailed
	// FlagHBONERefused: the destination node's ztunnel answered the
	// CONNECT with an error status.
	FlagHBONERefused
	// FlagShutdown: the ztunnel is shutting down: it closed the flow (both
	// applications got a reset) when it stopped, or when Shutdown's drain
	// ran out.
	FlagShutdown
	// FlagDeniedDefault: no ALLOW policy selects the destination and
	// default-deny applies to it.
	FlagDeniedDefault
	// FlagStrictPlaintext: a plaintext connection to a workload in STRICT
	// mTLS mode.
	FlagStrictPlaintext
	// FlagRateLimited: the source identity (the source IP for plaintext)
	// opened new connections to the workload faster than its rate limit.
	FlagRateLimited
	// FlagMaxConnections: the destination workload has as many concurrent
	// connections as its limit.
	FlagMaxConnections
	// FlagFlowLimit: the ztunnel has Config.MaxFlows flows open.
	FlagFlowLimit
	// FlagClosed: an open flow was closed by LiveFlow.Close without a
	// more specific reason.
	FlagClosed
	// FlagHandshakeTimeout: an HBONE client did not finish its TLS
	// handshake within the handshake timeout of its connection's arrival.
	FlagHandshakeTimeout
	// FlagPendingLimit: Limits.MaxPendingHandshakes HBONE connections were
	// waiting for their TLS handshake; the connection was refused, or shed
	// to make room for one from a source that held fewer (see Limits).
	FlagPendingLimit
	// FlagSourceLimit: the connection's source IP already held as many
	// connections of its kind as Limits allows it (pending HBONE
	// handshakes, inbound plaintext, outbound per pod).
	FlagSourceLimit
	// FlagDescriptorReserve: an unauthenticated connection (HBONE before
	// its handshake, inbound plaintext) refused, or shed, because the
	// ztunnel's connections use all the file descriptors but
	// Limits.DescriptorReserve, which outbound capture and established
	// tunnels keep.
	FlagDescriptorReserve
	// FlagAcceptFailed: a listener's accept failed (out of file
	// descriptors, typically); the ztunnel backs off and retries. Not a
	// connection of its own: the kernel keeps it queued.
	FlagAcceptFailed
	// FlagDownstreamReset: the client's connection broke while the flow
	// was open: the client reset it, or reading or writing it failed.
	// Recorded by the ztunnel that accepted it; a destination's ztunnel
	// records it for an HBONE stream that a source other than Go's (which
	// sends CANCEL) reset with CONNECT_ERROR.
	FlagDownstreamReset
	// FlagUpstreamReset: the connection to the destination broke while
	// the flow was open: the destination reset it, or reading or writing
	// it failed. Recorded by the ztunnel that dialled it, and by the
	// source ztunnel of an HBONE flow that the destination's ztunnel
	// reset with CONNECT_ERROR (RFC 9113, section 8.5), which it does for
	// exactly this.
	FlagUpstreamReset
	// FlagTunnelReset: the peer ztunnel reset the HBONE stream
	// (RST_STREAM, CANCEL or another code than CONNECT_ERROR): its side of
	// the flow ended abnormally, and its record says how.
	FlagTunnelReset
	// FlagTunnelLost: the HBONE connection under the flow broke: the peer
	// ztunnel went away (closed it with the stream open, or its process
	// died), a TLS or HTTP/2 error, a keepalive timeout.
	FlagTunnelLost
	// FlagRapidReset: an HBONE client reset streams the ztunnel was still
	// working on faster than hbone.Tuning's ResetRate (the HTTP/2 rapid
	// reset attack); its connection was closed with GOAWAY.
	FlagRapidReset
	// FlagFrameFlood: an HBONE client sent frames that carry no work
	// (PING, SETTINGS, empty DATA, refused requests...) faster than
	// hbone.Tuning's FloodRate, or did not read the answers; its
	// connection was closed with GOAWAY.
	FlagFrameFlood

	numFlags
)

var flagNames = [numFlags]string{
	FlagNone:               "-",
	FlagUnknownSource:      "unknown_source",
	FlagLoop:               "loop_refused",
	FlagNoSVID:             "no_svid",
	FlagNoLocalWorkload:    "no_local_workload",
	FlagTLSNoClientCert:    "tls_no_client_cert",
	FlagTLSUntrustedDomain: "tls_untrusted_domain",
	FlagTLSUnknownCA:       "tls_unknown_ca",
	FlagTLSExpired:         "tls_expired_cert",
	FlagTLSPeerMismatch:    "tls_peer_mismatch",
	FlagTLSBadCert:         "tls_bad_cert",
	FlagTLSHandshake:       "tls_handshake_failed",
	FlagHTTP1:              "http1_refused",
	FlagNotConnect:         "not_connect",
	FlagHeadersTooLarge:    "headers_too_large",
	FlagMalformed:          "malformed_request",
	FlagRelayRefused:       "relay_refused",
	FlagForwardedSpoofed:   "forwarded_spoofed",
	FlagPolicyDenied:       "policy_denied",
	FlagStreamLimit:        "stream_limit",
	FlagConnectFailed:      "connect_failed",
	FlagConnectTimeout:     "connect_timeout",
	FlagHBONEConnectFailed: "hbone_connect_failed",
	FlagHBONERefused:       "hbone_refused",
	FlagShutdown:           "shutting_down",
	FlagDeniedDefault:      "denied_default",
	FlagStrictPlaintext:    "strict_plaintext",
	FlagRateLimited:        "rate_limited",
	FlagMaxConnections:     "max_connections",
	FlagFlowLimit:          "flow_limit",
	FlagClosed:             "closed",
	FlagHandshakeTimeout:   "tls_handshake_timeout",
	FlagPendingLimit:       "pending_limit",
	FlagSourceLimit:        "source_limit",
	FlagDescriptorReserve:  "fd_reserve",
	FlagAcceptFailed:       "accept_failed",
	FlagDownstreamReset:    "downstream_reset",
	FlagUpstreamReset:      "upstream_reset",
	FlagTunnelReset:        "tunnel_reset",
	FlagTunnelLost:         "tunnel_lost",
	FlagRapidReset:         "rapid_reset",
	FlagFrameFlood:         "frame_flood",
}

// String returns the flag's name, e.g. "policy_denied"; "-" for FlagNone.
func (f ResponseFlag) String() string {
	if f < numFlags {
		return flagNames[f]
	}
	return "unknown"
}

// Flags returns every flag, FlagNone first (for metrics that pre-create
// their series).
func Flags() []ResponseFlag {
	out := make([]ResponseFlag, numFlags)
	for i := range out {
		out[i] = ResponseFlag(i)
	}
	return out
}

// broke reports whether f says how an admitted flow broke, rather than
// why one was refused. FlagClosed is an admitted flow cut without a more
// specific reason (LiveFlow.Close, or its context ended first): logged
// as "ztunnel: refused", an operator (and a count of refusal lines) would
// take it for a connection refused.
func (f ResponseFlag) broke() bool {
	switch f {
	case FlagDownstreamReset, FlagUpstreamReset, FlagTunnelReset, FlagTunnelLost, FlagShutdown, FlagClosed:
		return true
	}
	return false
}

// tlsFlag classifies a TLS handshake or verification error.
func tlsFlag(err error) ResponseFlag {
	switch {
	case errors.Is(err, hbone.ErrNoPeerCert):
		return FlagTLSNoClientCert
	case errors.Is(err, hbone.ErrUntrustedDomain):
		return FlagTLSUntrustedDomain
	case errors.Is(err, hbone.ErrUnknownAuthority):
		return FlagTLSUnknownCA
	case errors.Is(err, hbone.ErrExpired):
		return FlagTLSExpired
	case errors.Is(err, hbone.ErrPeerMismatch):
		return FlagTLSPeerMismatch
	case errors.Is(err, hbone.ErrNotSVID):
		return FlagTLSBadCert
	}
	return FlagTLSHandshake
}

// serverRefusalFlag maps the hbone server's own refusals.
func serverRefusalFlag(err error) ResponseFlag {
	switch {
	case errors.Is(err, hbone.ErrHTTP1):
		return FlagHTTP1
	case errors.Is(err, hbone.ErrNotConnect):
		return FlagNotConnect
	case errors.Is(err, hbone.ErrHeadersTooLarge):
		return FlagHeadersTooLarge
	case errors.Is(err, hbone.ErrStreamLimit):
		return FlagStreamLimit
	case errors.Is(err, hbone.ErrRapidReset):
		return FlagRapidReset
	case errors.Is(err, hbone.ErrFrameFlood):
		return FlagFrameFlood
	}
	return FlagMalformed
}
