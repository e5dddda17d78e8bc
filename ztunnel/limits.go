package ztunnel

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// Defaults of Limits.
const (
	// DefaultMaxPendingHandshakes is the default of
	// Limits.MaxPendingHandshakes.
	DefaultMaxPendingHandshakes = 4096
	// DefaultMaxPendingPerIP is the default of Limits.MaxPendingPerIP.
	DefaultMaxPendingPerIP = 128
	// DefaultMaxInboundPlaintextPerIP is the default of
	// Limits.MaxInboundPlaintextPerIP.
	DefaultMaxInboundPlaintextPerIP = 1024
)

// Limits bound what connections that have proved no identity, and any
// one source, may hold of the ztunnel. Anyone who can reach a node (the
// underlay, an unmeshed pod) can open TCP connections to :15008 and
// :15006 without a certificate; these limits keep such connections from
// using up the ztunnel's goroutines and file descriptors. The HBONE
// handshake deadline is Tuning.HandshakeTimeout, counted from the
// connection's arrival. Zero fields take their defaults;
// docs/hbone.md#accept-limits explains the choices.
type Limits struct {
	// MaxPendingHandshakes bounds the HBONE connections (:15008) accepted
	// whose TLS handshake has not ended yet, from all sources together
	// (default DefaultMaxPendingHandshakes). When it is reached, a new
	// connection sheds the newest pending connection of the source that
	// holds the most, if that source holds at least two more than the new
	// connection's source would; otherwise the new connection is refused
	// (FlagPendingLimit).
	MaxPendingHandshakes int
	// MaxPendingPerIP bounds the pending HBONE handshakes of one source IP
	// (an IPv6 source: its /64); beyond it new connections are refused
	// (FlagSourceLimit). Default DefaultMaxPendingPerIP.
	MaxPendingPerIP int
	// MaxInboundPlaintextPerIP bounds the open inbound plaintext
	// connections (:15006) of one source IP (FlagSourceLimit). Default
	// DefaultMaxInboundPlaintextPerIP.
	MaxInboundPlaintextPerIP int
	// MaxOutboundPerPod bounds the open outbound connections (:15001) of
	// one local pod IP (FlagSourceLimit), so that one pod cannot take all
	// the descriptors of its node. Default: a quarter of Descriptors; no
	// limit but Config.MaxFlows when Descriptors is 0.
	MaxOutboundPerPod int
	// Descriptors is how many file descriptors the ztunnel's connections
	// may use in all (accepted connections, connections to destinations,
	// pooled HBONE connections): the process's limit minus what the rest
	// of the process needs. 0 turns descriptor accounting off.
	Descriptors int
	// DescriptorReserve is the part of Descriptors that only outbound
	// capture and authenticated HBONE use: once the ztunnel's connections
	// use Descriptors - DescriptorReserve, unauthenticated connections
	// (pending HBONE handshakes, inbound plaintext) are refused, and a new
	// HBONE connection is admitted only by shedding a pending one as
	// above (FlagDescriptorReserve). Default Descriptors/4.
	DescriptorReserve int
	// RefusalLogRate bounds the log lines of refusals that are not flows
	// (handshakes, these limits, accept errors) per second, with bursts of
	// five seconds' worth; the rest are counted, and one line every 5 s
	// sums them up by reason. Counters count every refusal. Default
	// DefaultRefusalLogRate.
	RefusalLogRate float64
}

// withDefaults fills zero fields.
func (l Limits) withDefaults() Limits {
	if l.MaxPendingHandshakes <= 0 {
		l.MaxPendingHandshakes = DefaultMaxPendingHandshakes
	}
	if l.MaxPendingPerIP <= 0 {
		l.MaxPendingPerIP = DefaultMaxPendingPerIP
	}
	if l.MaxInboundPlaintextPerIP <= 0 {
		l.MaxInboundPlaintextPerIP = DefaultMaxInboundPlaintextPerIP
	}
	if l.Descriptors < 0 {
		l.Descriptors = 0
	}
	if l.MaxOutboundPerPod <= 0 {
		l.MaxOutboundPerPod = 0 // no limit of its own
		if l.Descriptors > 0 {
			l.MaxOutboundPerPod = max(1, l.Descriptors/4)
		}
	}
	if l.DescriptorReserve <= 0 {
		l.DescriptorReserve = l.Descriptors / 4
	}
	l.DescriptorReserve = min(l.DescriptorReserve, l.Descriptors)
	if l.RefusalLogRate <= 0 {
		l.RefusalLogRate = DefaultRefusalLogRate
	}
	return l
}

// AdmissionStats is a snapshot of the accept path's state (for metrics).
type AdmissionStats struct {
	// PendingHandshakes counts HBONE connections whose TLS handshake has
	// not ended; PendingSources the source IPs they come from.
	PendingHandshakes, PendingSources int
	// InboundPlaintext and Outbound count the open connections of those
	// listeners.
	InboundPlaintext, Outbound int
	// Descriptors estimates the file descriptors the ztunnel's
	// connections use, from above: accepted connections, open flows (each
	// counted with one connection to its destination, though outbound
	// HBONE flows share the pool's) and pooled HBONE connections.
	Descriptors int
	// DescriptorBudget and DescriptorReserve are Limits.Descriptors and
	// Limits.DescriptorReserve (0 when accounting is off).
	DescriptorBudget, DescriptorReserve int
}

// Admission returns the accept path's state.
func (p *Proxy) Admission() AdmissionStats {
	return AdmissionStats{
		PendingHandshakes: p.pending.held(), PendingSources: p.pending.sources(),
		InboundPlaintext: p.plain.held(), Outbound: p.outbound.held(),
		Descriptors:      p.descriptors(),
		DescriptorBudget: p.limits.Descriptors, DescriptorReserve: p.limits.DescriptorReserve,
	}
}

// descriptors estimates the descriptors the ztunnel's connections use.
func (p *Proxy) descriptors() int {
	return int(p.accepted.Load() + p.live.n.Load() + p.pooled.Load())
}

// short reports whether unauthenticated connections must stay out to
// keep the descriptor reserve.
func (p *Proxy) short() bool {
	l := p.limits
	return l.Descriptors > 0 && p.descriptors() >= l.Descriptors-l.DescriptorReserve
}

// listenerKind names the ztunnel's listeners.
type listenerKind uint8

const (
	listenOutbound listenerKind = iota
	listenHBONE
	listenInboundPlain
)

func (k listenerKind) String() string {
	switch k {
	case listenOutbound:
		return "outbound"
	case listenHBONE:
		return "hbone"
	default:
		return "inbound_plaintext"
	}
}

// admitConn decides whether an accepted connection may be served; it returns
// its ticket, or closes it, counts and logs the refusal and returns nil.
// A pending HBONE connection it shed to make room is closed the same way.
func (p *Proxy) admitConn(kind listenerKind, c net.Conn) (*ticket, bool) {
	remote, _ := hbone.AddrOf(c.RemoteAddr())
	now := time.Now()
	var (
		t, shed *ticket
		why     admitResult
		table   *admission
	)
	switch kind {
	case listenHBONE:
		table = p.pending
		t, shed, why = table.admit(remote, c, now, p.short())
	case listenInboundPlain:
		table = p.plain
		if p.short() {
			why = refusedPress
		} else {
			t, _, why = table.admit(remote, c, now, false)
		}
	default:
		table = p.outbound
		t, _, why = table.admit(remote, c, now, false)
	}
	if shed != nil {
		p.refuse(kind, shed.conn, shed.shedWhy, true, table)
	}
	if t == nil {
		var flag ResponseFlag
		switch why {
		case refusedSrc:
			flag = FlagSourceLimit
		case refusedPress:
			flag = FlagDescriptorReserve
		default:
			flag = FlagPendingLimit
			if kind != listenHBONE {
				flag = FlagFlowLimit
			}
		}
		p.refuse(kind, c, flag, false, table)
		return nil, false
	}
	return t, true
}

// refuse resets c (no FIN handshake, no TIME_WAIT for a connection that
// never carried anything), counts flag and logs at the refusals' rate.
func (p *Proxy) refuse(kind listenerKind, c net.Conn, flag ResponseFlag, shed bool, table *admission) {
	if tc, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
	p.counters[flag].Add(1)
	if !p.refusals.allow(slog.LevelInfo, flag) {
		return
	}
	remote, _ := hbone.AddrOf(c.RemoteAddr())
	local, _ := hbone.AddrOf(c.LocalAddr())
	what := "refused"
	if shed {
		what = "shed"
	}
	p.log.Info("ztunnel: refused", "reason", flag.String(), "listener", kind.String(),
		"src", remote, "dst", local, "action", what, "error", p.limitError(kind, flag, remote.Addr(), table))
}

// limitError says which limit refused a connection.
func (p *Proxy) limitError(kind listenerKind, flag ResponseFlag, src netip.Addr, table *admission) error {
	l := p.limits
	switch flag {
	case FlagSourceLimit:
		return fmt.Errorf("ztunnel: %s already holds %d %s connections, its limit", sourceKey(src), table.perSource, kind)
	case FlagDescriptorReserve:
		return fmt.Errorf("ztunnel: connections use %d of %d descriptors; the last %d are kept for outbound capture and established tunnels",
			p.descriptors(), l.Descriptors, l.DescriptorReserve)
	case FlagPendingLimit:
		return fmt.Errorf("ztunnel: %d HBONE handshakes pending, the limit", table.max)
	default:
		return fmt.Errorf("ztunnel: %d %s connections open, the limit", table.max, kind)
	}
}
