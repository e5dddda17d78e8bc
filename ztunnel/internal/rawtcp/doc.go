// Package rawtcp provides TCP sockets that live outside Go's network
// poller, so that an idle connection costs only ordinary heap memory that
// is freed after Close, and so that a caller can wait for a socket to
// become readable without parking a goroutine on it.
//
// Go's runtime never returns the memory it keeps per socket (the poller's
// record, allocated off-heap for ever) nor per goroutine (reachable from the
// list of all goroutines for ever). A proxy holding many idle flows pays
// both for every flow it ever had. A [Conn] instead registers its socket,
// edge-triggered, with one epoll instance of this package, served by a
// single goroutine; per-connection state is a small heap object, and
// [Conn.WaitRead] hands a callback to that goroutine instead of blocking.
// A listening socket moves there too ([Listen]): [Listener.Accept] takes
// connections with accept4, without a socket or a record of Go's.
//
// The package works on Linux only; elsewhere Listen and Dial return
// [errors.ErrUnsupported].
package rawtcp
