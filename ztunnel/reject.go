package ztunnel

import (
	"net/netip"
	"sync"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Rejection describes a refusal of the HBONE server that is no flow: a
// malformed request, a stream beyond the limit, or a client closed for
// abuse (FlagRapidReset, FlagFrameFlood). Config.OnReject receives them.
type Rejection struct {
	// Time of the refusal.
	Time time.Time
	// Flag is the reason.
	Flag ResponseFlag
	// Err is the server's error (it names the client's identity for
	// abuse).
	Err error
	// Src is the client ztunnel's address, SrcID its certificate's
	// identity; Dst the address the HBONE connection was made to (the
	// destination pod).
	Src, Dst netip.AddrPort
	SrcID    spiffeid.ID
}

// serverRefused is the HBONE server's Refused: count, log (rate-limited),
// and tell Config.OnReject.
func (p *Proxy) serverRefused(c *hbone.Conn, err error) {
	flag := serverRefusalFlag(err)
	p.reject(flag, err, "src", c.Remote, "dst", c.Local, "src_id", c.PeerID)
	if p.cfg.OnReject != nil {
		p.cfg.OnReject(&Rejection{Time: time.Now(), Flag: flag, Err: err, Src: c.Remote, Dst: c.Local, SrcID: c.PeerID})
	}
}

// Refusal log lines are rate-limited: clients can cause them at will.
const (
	logRate  = 50  // lines per second
	logBurst = 200 // lines at once
)

// logLimiter is a token bucket for log lines that counts what it drops.
type logLimiter struct {
	mu      sync.Mutex
	tokens  float64
	last    time.Time
	dropped uint64
}

// allow takes a token; it returns whether the line may be written and how
// many lines were dropped since the last one written.
func (l *logLimiter) allow(now time.Time) (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last.IsZero() {
		l.tokens = logBurst
	} else {
		l.tokens = min(logBurst, l.tokens+now.Sub(l.last).Seconds()*logRate)
	}
	l.last = now
	if l.tokens < 1 {
		l.dropped++
		return false, 0
	}
	l.tokens--
	d := l.dropped
	l.dropped = 0
	return true, d
}
