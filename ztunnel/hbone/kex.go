package hbone

import (
	"crypto/tls"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
)

// KeyExchange is the set of TLS 1.3 key exchange groups that an HBONE end
// offers (client) or accepts (server); Go picks among them in its own
// order, post-quantum hybrids first, so the order here does not matter.
// Both ends must share one, or the handshake fails ("tls: no key
// exchanges supported by both client and server"; the server counts it as
// a refused handshake).
//
// The default, DefaultKeyExchange, is the hybrid X25519MLKEM768 with
// X25519 beside it: mantlet's agents agree on the hybrid, so traffic
// recorded today cannot be decrypted by a quantum computer later, and a
// peer that lacks it (an older ztunnel) still gets X25519 without another
// round trip (the client sends a key share of each). The hybrid costs a
// handshake about 0.2 ms more CPU on each side, +52 % (docs/hbone.md, "Key
// exchange"), paid once per pooled connection, not per stream.
type KeyExchange []tls.CurveID

// DefaultKeyExchange returns the default set: X25519MLKEM768 and X25519.
func DefaultKeyExchange() KeyExchange {
	return KeyExchange{tls.X25519MLKEM768, tls.X25519}
}

// kexGroup is a key exchange group and its name (Go's tls.CurveID name,
// P256 and P384 without "Curve").
type kexGroup struct {
	id   tls.CurveID
	name string
}

// keyExchangeGroups are the groups --hbone-key-exchange may name, matched
// by name without regard to case.
var keyExchangeGroups = [...]kexGroup{
	{tls.X25519MLKEM768, "X25519MLKEM768"},
	{tls.SecP256r1MLKEM768, "SecP256r1MLKEM768"},
	{tls.SecP384r1MLKEM1024, "SecP384r1MLKEM1024"},
	{tls.X25519, "X25519"},
	{tls.CurveP256, "P256"},
	{tls.CurveP384, "P384"},
}

// ParseKeyExchange reads a comma-separated list of group names, such as
// "X25519MLKEM768,X25519" or "X25519MLKEM768" (post-quantum only).
func ParseKeyExchange(s string) (KeyExchange, error) {
	var k KeyExchange
	for name := range strings.SplitSeq(s, ",") {
		name = strings.TrimSpace(name)
		i := slices.IndexFunc(keyExchangeGroups[:], func(g kexGroup) bool { return strings.EqualFold(g.name, name) })
		if i < 0 {
			var all []string
			for _, g := range keyExchangeGroups {
				all = append(all, g.name)
			}
			return nil, fmt.Errorf("unknown key exchange group %q: want a comma-separated list of %s", name, strings.Join(all, ", "))
		}
		if !slices.Contains(k, keyExchangeGroups[i].id) {
			k = append(k, keyExchangeGroups[i].id)
		}
	}
	return k, nil
}

// String returns the groups' names, comma-separated.
func (k KeyExchange) String() string {
	names := make([]string, len(k))
	for i, id := range k {
		names[i] = id.String()
		for _, g := range keyExchangeGroups {
			if g.id == id {
				names[i] = g.name
			}
		}
	}
	return strings.Join(names, ",")
}

// KeyExchangeCounter counts TLS handshakes by the group they agreed on;
// groups outside the ones --hbone-key-exchange can name count as "other".
// Its zero value is ready; it is safe for concurrent use.
type KeyExchangeCounter struct {
	n [len(keyExchangeGroups) + 1]atomic.Uint64
}

// Add counts a handshake that agreed on id.
func (c *KeyExchangeCounter) Add(id tls.CurveID) {
	i := len(keyExchangeGroups)
	for j, g := range keyExchangeGroups {
		if g.id == id {
			i = j
		}
	}
	c.n[i].Add(1)
}

// Counts returns the handshakes counted, by group name (groups not seen
// left out).
func (c *KeyExchangeCounter) Counts() map[string]uint64 {
	out := map[string]uint64{}
	for i := range c.n {
		n := c.n[i].Load()
		if n == 0 {
			continue
		}
		name := "other"
		if i < len(keyExchangeGroups) {
			name = keyExchangeGroups[i].name
		}
		out[name] = n
	}
	return out
}
