//go:build !race

package rawtcp

// ioRead and ioWrite are the reads and writes of Conn: raw (sys_linux.go).
func ioRead(fd int, b []byte) (int, error)  { return rawRead(fd, b) }
func ioWrite(fd int, b []byte) (int, error) { return rawWrite(fd, b) }
