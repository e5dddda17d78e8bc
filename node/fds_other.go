//go:build !unix

package node

import "errors"

func raiseFileLimit() (soft, hard int, err error) {
	return 0, 0, errors.New("open-file limit: not supported on this system")
}

func openDescriptors() (int, error) {
	return 0, errors.New("count open descriptors: not supported on this system")
}
