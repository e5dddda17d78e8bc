package ztunnel

import (
	"net/netip"
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
