package testbed

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// recorder keeps what is written through a connection.
type recorder struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (r *recorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	r.out.Write(b)
	r.mu.Unlock()
	return r.Conn.Write(b)
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.out.Bytes())
}

func selfSigned(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"server.test"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// handshake runs a TLS handshake over a pipe and returns what each side
// sent.
func handshake(t testing.TB, maxVersion uint16) (client, server []byte) {
	t.Helper()
	c, s := net.Pipe()
	rc, rs := &recorder{Conn: c}, &recorder{Conn: s}
	srv := tls.Server(rs, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, NextProtos: []string{"h2"}, MaxVersion: maxVersion})
	cli := tls.Client(rc, &tls.Config{ServerName: "server.test", InsecureSkipVerify: true, NextProtos: []string{"h2"}, MaxVersion: maxVersion})
	done := make(chan error, 1)
	go func() { done <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()
	return rc.bytes(), rs.bytes()
}

func TestParseTLSHelloTellsTLS13FromTLS12(t *testing.T) {
	c13, s13 := handshake(t, tls.VersionTLS13)
	c12, s12 := handshake(t, tls.VersionTLS12)
	tests := []struct {
		name        string
		stream      []byte
		typ         uint8
		version     uint16
		sni         string
		alpn        []string
		certInClear bool
	}{
		{"TLS 1.3 client hello", c13, TLSClientHello, VersionTLS13, "server.test", []string{"h2"}, false},
		{"TLS 1.3 server hello hides the certificate", s13, TLSServerHello, VersionTLS13, "", nil, false},
		{"TLS 1.2 client hello", c12, TLSClientHello, VersionTLS12, "server.test", []string{"h2"}, false},
		{"TLS 1.2 server shows the certificate", s12, TLSServerHello, VersionTLS12, "", []string{"h2"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := ParseTLSHello(tt.stream)
			if err != nil {
				t.Fatal(err)
			}
			if h.Type != tt.typ || h.Version() != tt.version || h.ServerName != tt.sni || !slices.Equal(h.ALPN, tt.alpn) || h.PlaintextCertificate != tt.certInClear {
				t.Errorf("got type %d version %#x SNI %q ALPN %q certificate in clear %v\nwant type %d version %#x SNI %q ALPN %q certificate in clear %v",
					h.Type, h.Version(), h.ServerName, h.ALPN, h.PlaintextCertificate, tt.typ, tt.version, tt.sni, tt.alpn, tt.certInClear)
			}
		})
	}
}

func TestParseTLSHelloRejectsOtherData(t *testing.T) {
	c13, _ := handshake(t, tls.VersionTLS13)
	for name, in := range map[string][]byte{
		"HTTP":           []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"empty":          nil,
		"only a header":  c13[:5],
		"truncated body": c13[:40],
	} {
		if h, err := ParseTLSHello(in); err == nil {
			t.Errorf("%s: parsed as %+v, want an error", name, h)
		}
	}
}

func FuzzParseTLSHello(f *testing.F) {
	c13, s13 := handshake(f, tls.VersionTLS13)
	_, s12 := handshake(f, tls.VersionTLS12)
	for _, seed := range [][]byte{c13, s13, s12, c13[:60], []byte("\x16\x03\x01\x00\x04\x01\x00\x00\x00")} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseTLSHello(b)
		if err == nil && h == nil {
			t.Fatal("no hello and no error")
		}
		if err == nil {
			_ = h.Version()
		}
	})
}
