package testbed

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// TLS handshake message types in TLSHello.Type.
const (
	TLSClientHello = 1
	TLSServerHello = 2
)

// TLS versions.
const (
	VersionTLS12 = 0x0303
	VersionTLS13 = 0x0304
)

// TLSHello is what an observer on the wire learns from the start of one
// direction of a TLS connection.
type TLSHello struct {
	// Type is TLSClientHello or TLSServerHello.
	Type uint8
	// LegacyVersion is the hello's version field (0x0303 in TLS 1.3).
	LegacyVersion uint16
	// SupportedVersions is the supported_versions extension: the versions
	// a client offers, or the one a server selected.
	SupportedVersions []uint16
	// ServerName is the client's SNI, empty when it sent none.
	ServerName string
	// ALPN lists the client's protocols, or the server's choice (visible
	// only up to TLS 1.2: TLS 1.3 encrypts it with the certificate).
	ALPN []string
	// PlaintextCertificate is true when a Certificate message follows in
	// clear (TLS 1.2 and older). In TLS 1.3 the server's certificate is
	// encrypted, so an observer cannot read it: a test that wants to check
	// the certificate must get it from an endpoint, not from a capture.
	PlaintextCertificate bool
}

// Version returns the negotiated version as a server hello states it (the
// selected supported_versions entry, else the legacy field). For a client
// hello it returns the highest version offered.
func (h *TLSHello) Version() uint16 {
	v := h.LegacyVersion
	for _, s := range h.SupportedVersions {
		if s&0x0f0f == 0x0a0a {
			continue // GREASE
		}
		if h.Type == TLSServerHello || s > v {
			v = s
		}
	}
	return v
}

// ErrNotTLS is returned by ParseTLSHello for data that does not start with
// a TLS handshake record.
var ErrNotTLS = errors.New("testbed: not a TLS handshake")

// ParseTLSHello parses the start of one direction of a TCP stream (see
// Streams) as TLS: the ClientHello or ServerHello it begins with, and
// whether a certificate follows in clear. It reads only plaintext
// handshake records, up to the first ChangeCipherSpec or encrypted record.
func ParseTLSHello(stream []byte) (*TLSHello, error) {
	// Gather the plaintext handshake bytes: a message may span records,
	// and a record may hold several messages.
	var hs []byte
	for rest := stream; len(rest) >= 5; {
		typ, n := rest[0], int(binary.BigEndian.Uint16(rest[3:5]))
		if len(hs) == 0 && (typ != 22 || rest[1] != 3) {
			return nil, ErrNotTLS
		}
		if typ != 22 {
			break // change_cipher_spec or application_data: encrypted from here
		}
		if len(rest) < 5+n {
			hs = append(hs, rest[5:]...)
			break
		}
		hs = append(hs, rest[5:5+n]...)
		rest = rest[5+n:]
	}
	if len(hs) == 0 {
		return nil, ErrNotTLS
	}
	var h *TLSHello
	for len(hs) >= 4 {
		typ, n := hs[0], int(hs[1])<<16|int(hs[2])<<8|int(hs[3])
		if len(hs) < 4+n {
			if h == nil {
				return nil, fmt.Errorf("testbed: TLS hello truncated: %d of %d bytes", len(hs)-4, n)
			}
			if typ == 11 {
				h.PlaintextCertificate = true
			}
			break
		}
		body := hs[4 : 4+n]
		hs = hs[4+n:]
		if h == nil {
			if typ != TLSClientHello && typ != TLSServerHello {
				return nil, fmt.Errorf("testbed: TLS handshake starts with message type %d, not a hello", typ)
			}
			var err error
			if h, err = parseHello(typ, body); err != nil {
				return nil, err
			}
			continue
		}
		if typ == 11 {
			h.PlaintextCertificate = true
		}
	}
	if h == nil {
		return nil, ErrNotTLS
	}
	return h, nil
}

// reader reads big-endian fields and length-prefixed vectors; after an
// overrun every read returns zero values and ok reports false.
type reader struct {
	b  []byte
	ok bool
}

func (r *reader) bytes(n int) []byte {
	if !r.ok || n < 0 || len(r.b) < n {
		r.ok = false
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() int {
	b := r.bytes(1)
	if b == nil {
		return 0
	}
	return int(b[0])
}

func (r *reader) u16() int {
	b := r.bytes(2)
	if b == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(b))
}

func (r *reader) vec8() *reader {
	b := r.bytes(r.u8())
	return &reader{b: b, ok: r.ok}
}

func (r *reader) vec16() *reader {
	b := r.bytes(r.u16())
	return &reader{b: b, ok: r.ok}
}

func parseHello(typ uint8, body []byte) (*TLSHello, error) {
	h := &TLSHello{Type: typ}
	r := &reader{b: body, ok: true}
	h.LegacyVersion = uint16(r.u16())
	r.bytes(32) // random
	r.vec8()    // session id
	if typ == TLSClientHello {
		r.vec16() // cipher suites
		r.vec8()  // compression methods
	} else {
		r.bytes(3) // cipher suite, compression method
	}
	if !r.ok {
		return nil, fmt.Errorf("testbed: TLS hello (type %d) malformed", typ)
	}
	if len(r.b) == 0 {
		return h, nil // no extensions (old TLS)
	}
	exts := r.vec16()
	for exts.ok && len(exts.b) > 0 {
		et := exts.u16()
		ext := exts.vec16()
		switch et {
		case 0: // server_name
			if typ == TLSClientHello {
				list := ext.vec16()
				for list.ok && len(list.b) > 0 {
					kind, name := list.u8(), list.vec16()
					if kind == 0 && name.ok {
						h.ServerName = string(name.b)
					}
				}
			}
		case 16: // application_layer_protocol_negotiation
			list := ext.vec16()
			for list.ok && len(list.b) > 0 {
				if p := list.vec8(); p.ok {
					h.ALPN = append(h.ALPN, string(p.b))
				}
			}
		case 43: // supported_versions
			if typ == TLSServerHello {
				h.SupportedVersions = []uint16{uint16(ext.u16())}
				break
			}
			list := ext.vec8()
			for list.ok && len(list.b) >= 2 {
				h.SupportedVersions = append(h.SupportedVersions, uint16(list.u16()))
			}
		}
	}
	if !exts.ok {
		return nil, fmt.Errorf("testbed: TLS hello (type %d) extensions malformed", typ)
	}
	return h, nil
}
