package main

import (
	"flag"
	"fmt"

	"github.com/mantlet/mantlet/node"
	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

// addLimitFlags binds the flags of the ztunnel's accept path: what
// connections without a certificate, and any one source, may hold
// (docs/hbone.md#accept-limits).
func addLimitFlags(fs *flag.FlagSet, l *node.LimitsConfig) {
	fs.DurationVar(&l.HandshakeTimeout, "hbone-handshake-timeout", hbone.DefaultTuning().HandshakeTimeout,
		"an HBONE connection must finish its TLS handshake within this time of its arrival (and send the HTTP/2 preface within as long after); also bounds the HBONE client's dial and handshake")
	fs.IntVar(&l.MaxPending, "max-pending-handshakes", ztunnel.DefaultMaxPendingHandshakes,
		"HBONE connections (:15008) whose TLS handshake has not ended, from all sources together; when full, the newest pending connection of the source holding the most is shed for a source holding fewer, else the new one is refused")
	fs.IntVar(&l.MaxPendingPerIP, "max-pending-handshakes-per-ip", ztunnel.DefaultMaxPendingPerIP,
		"pending HBONE handshakes of one source IP (an IPv6 /64); beyond it new connections are refused")
	fs.IntVar(&l.MaxPlainPerIP, "max-inbound-plaintext-per-ip", ztunnel.DefaultMaxInboundPlaintextPerIP,
		"open inbound plaintext connections (:15006) of one source IP")
	fs.IntVar(&l.MaxOutboundPerPod, "max-outbound-per-pod", 0,
		"open outbound connections (:15001) of one local pod IP (0: a quarter of the descriptor budget)")
	fs.IntVar(&l.FDReserve, "fd-reserve", 0,
		"file descriptors kept for outbound capture and established tunnels: connections without a certificate are refused once only these are left (0: a quarter of the descriptor budget)")
	fs.IntVar(&l.StreamsPerConn, "hbone-streams-per-conn", hbone.DefaultTuning().MaxStreamsPerConn,
		"CONNECT streams the HBONE client puts on one pooled connection before it dials another")
	fs.IntVar(&l.ConnsPerKey, "hbone-conns-per-key", hbone.DefaultTuning().MaxConnsPerKey,
		"pooled HBONE connections per (source identity, destination identity, destination pod IP); with --hbone-streams-per-conn it bounds the open connections from one pod to one pod")
	fs.IntVar(&l.SpreadConnsPerKey, "hbone-spread-conns", 0,
		"pooled HBONE connections per key that new streams spread over before two share one, so that parallel bulk streams use several cores (0: GOMAXPROCS; 1: as few connections as possible)")
	l.KeyExchange = hbone.DefaultKeyExchange()
	fs.Func("hbone-key-exchange", "TLS 1.3 key exchange groups of HBONE, comma-separated, offered as client and accepted as server (default "+
		hbone.DefaultKeyExchange().String()+": the post-quantum hybrid, X25519 for a peer without it; X25519MLKEM768 alone refuses such peers; X25519 alone saves about 0.2 ms of CPU per handshake)",
		func(s string) error {
			k, err := hbone.ParseKeyExchange(s)
			if err != nil {
				return err
			}
			l.KeyExchange = k
			return nil
		})
	fs.Float64Var(&l.RefusalLogRate, "refusal-log-rate", ztunnel.DefaultRefusalLogRate,
		"log lines per second for refused handshakes and connections (bursts of 5 seconds' worth); the rest are counted and summed up every 5 s")
}

// check validates the flags; the message names the flag.
func checkLimits(l *node.LimitsConfig) error {
	switch {
	case l.HandshakeTimeout <= 0:
		return fmt.Errorf("--hbone-handshake-timeout %v: want a positive duration", l.HandshakeTimeout)
	case l.MaxPending <= 0:
		return fmt.Errorf("--max-pending-handshakes %d: want a positive number", l.MaxPending)
	case l.MaxPendingPerIP <= 0:
		return fmt.Errorf("--max-pending-handshakes-per-ip %d: want a positive number", l.MaxPendingPerIP)
	case l.MaxPlainPerIP <= 0:
		return fmt.Errorf("--max-inbound-plaintext-per-ip %d: want a positive number", l.MaxPlainPerIP)
	case l.MaxOutboundPerPod < 0:
		return fmt.Errorf("--max-outbound-per-pod %d: want 0 (a quarter of the descriptor budget) or a positive number", l.MaxOutboundPerPod)
	case l.FDReserve < 0:
		return fmt.Errorf("--fd-reserve %d: want 0 (a quarter of the descriptor budget) or a positive number", l.FDReserve)
	case l.StreamsPerConn <= 0:
		return fmt.Errorf("--hbone-streams-per-conn %d: want a positive number", l.StreamsPerConn)
	case l.ConnsPerKey <= 0:
		return fmt.Errorf("--hbone-conns-per-key %d: want a positive number", l.ConnsPerKey)
	case l.SpreadConnsPerKey < 0:
		return fmt.Errorf("--hbone-spread-conns %d: want 0 (GOMAXPROCS) or a positive number", l.SpreadConnsPerKey)
	case l.RefusalLogRate <= 0:
		return fmt.Errorf("--refusal-log-rate %v: want a positive number", l.RefusalLogRate)
	}
	return nil
}
