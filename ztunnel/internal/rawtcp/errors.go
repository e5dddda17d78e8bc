package rawtcp

import "errors"

// ErrWouldBlock is returned by TryRead when the socket has nothing to read
// yet; WaitRead then tells when to try again.
var ErrWouldBlock = errors.New("rawtcp: read would block")
