package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"time"
)

// PlaintextCloser ends the connections that a pod's switch to STRICT
// leaves behind. STRICT is enforced in the kernel on new connections
// only (pod_egress drops SYNs towards the pod that neither the ztunnel
// nor a node address sent), so a plaintext connection opened while the
// pod was PERMISSIVE, or before it was enrolled, by a client that did not
// go through the ztunnel (an unmeshed pod of the same node, for one)
// would live on. *PlainFlows implements it.
type PlaintextCloser interface {
	// ClosePlaintext ends the inbound connections to podIPs of the pod
	// behind the host-side veth ifindex whose client STRICT would now
	// refuse: neither the ztunnel nor one of the node's addresses. The
	// pod's own outgoing connections, connections inside the pod and
	// connections the ztunnel delivers stay. It returns the clients'
	// addresses of the connections it ended, also when it fails half-way.
	ClosePlaintext(ctx context.Context, ifindex int, podIPs []netip.Addr) ([]netip.AddrPort, error)
}

// plainCut is the agent's progress at ending a STRICT pod's plaintext
// connections (Config.Plaintext).
type plainCut struct {
	due      bool // the pod turned STRICT and its connections were not ended yet
	failures int
	retryAt  time.Time
	lastErr  string
}

// maxPeersLogged bounds the client addresses in the log line of one pod.
const maxPeersLogged = 8

// closePlaintext ends the plaintext connections of the pods that turned
// STRICT (see PlaintextCloser), after their veths were enrolled STRICT,
// so that no new plaintext connection can replace the ones it ends. A
// failure is logged and retried with backoff; the pod stays enrolled. It
// returns when the next retry is due (zero: none). Called with a.mu held.
func (a *Agent) closePlaintext(ctx context.Context, now time.Time) (next time.Time) {
	if a.cfg.Plaintext == nil {
		return next
	}
	for _, uid := range sortedKeys(a.pods) {
		st := a.pods[uid]
		c := &st.cut
		if !c.due || st.ifindex == 0 {
			continue
		}
		if ctx.Err() != nil {
			return next // shutting down: the next agent does it
		}
		if c.retryAt.After(now) {
			if next.IsZero() || c.retryAt.Before(next) {
				next = c.retryAt
			}
			continue
		}
		peers, err := a.cfg.Plaintext.ClosePlaintext(ctx, st.ifindex, st.ips)
		a.plainClosed.Add(uint64(len(peers)))
		if len(peers) > 0 || err == nil {
			level := slog.LevelInfo
			if len(peers) == 0 {
				level = slog.LevelDebug
			}
			logged := peers[:min(len(peers), maxPeersLogged)]
			a.log.Log(ctx, level, "STRICT: plaintext connections that bypassed the ztunnel closed",
				"pod", st.name, "ifindex", st.ifindex, "closed", len(peers), "clients", logged)
		}
		if err != nil {
			c.failures++
			wait := a.backoff(c.failures)
			c.retryAt = now.Add(wait)
			msg := err.Error()
			level := slog.LevelDebug
			if msg != c.lastErr {
				level = slog.LevelWarn
			}
			c.lastErr = msg
			a.log.Log(ctx, level, "agent: STRICT pod's plaintext connections not closed; will retry",
				"pod", st.name, "error", fmt.Errorf("close plaintext connections: %w", err), "attempts", c.failures, "retry_in", wait)
			if next.IsZero() || c.retryAt.Before(next) {
				next = c.retryAt
			}
			continue
		}
		*c = plainCut{}
	}
	return next
}

// PlaintextClosed counts the connections ended because their pod turned
// STRICT (Config.Plaintext) since the agent started.
func (a *Agent) PlaintextClosed() uint64 { return a.plainClosed.Load() }
