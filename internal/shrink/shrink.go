// Package shrink gives back the memory of maps whose size follows open
// connections. A Go map keeps the buckets of the most entries it ever
// held: a table of 10,000 flows that all ended still holds several
// hundred kilobytes until it is made anew. Delete does that once a map has
// fallen to a quarter of its peak, so an agent returns to its idle size
// after a burst of connections.
package shrink

import "maps"

// DefaultMin is the smallest peak after which Delete makes a map anew,
// when Peak.Min is 0.
const DefaultMin = 1024

// Peak remembers the most entries a map held before one was deleted. Its
// zero value is ready to use. It is not safe for concurrent use: keep it
// next to its map, under the map's lock.
type Peak struct {
	// Min is the smallest peak worth shrinking from (DefaultMin if 0): a
	// smaller map wastes little, and copying it would cost more than it
	// gives back.
	Min int
	n   int
}

// EmptyMin is the smallest peak after which Delete makes an emptied map
// anew, whatever Peak.Min says: there is nothing to copy, and the last
// copy of a map that shrank from a large peak still holds Min/4 entries'
// worth of table (about 40 KB after 10,000 flows).
const EmptyMin = 64

// Delete deletes k from *m, and replaces *m with a copy of what remains
// when that is at most a quarter of the map's peak and the peak reached
// p.Min, or with an empty map when it emptied a map whose peak reached
// EmptyMin. The copy costs O(len(*m)), and the peak restarts from its
// size, so the cost per delete stays constant. Do not call it while
// ranging over *m.
func Delete[M ~map[K]V, K comparable, V any](m *M, k K, p *Peak) {
	p.n = max(p.n, len(*m))
	delete(*m, k)
	if len(*m) == 0 && p.n >= EmptyMin {
		*m, p.n = make(M), 0
		return
	}
	from := p.Min
	if from <= 0 {
		from = DefaultMin
	}
	if p.n < from || len(*m) > p.n/4 {
		return
	}
	c := make(M, len(*m))
	maps.Copy(c, *m)
	*m, p.n = c, len(c)
}
