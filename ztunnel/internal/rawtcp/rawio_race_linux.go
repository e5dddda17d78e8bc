//go:build race

package rawtcp

import "golang.org/x/sys/unix"

// ioRead and ioWrite are the reads and writes of Conn: under the race
// detector x/sys/unix's, which tell the detector that a write to a
// descriptor happens before the read of what it wrote, as Go's own
// sockets do (sys_linux.go).
func ioRead(fd int, b []byte) (int, error)  { return unix.Read(fd, b) }
func ioWrite(fd int, b []byte) (int, error) { return unix.Write(fd, b) }
