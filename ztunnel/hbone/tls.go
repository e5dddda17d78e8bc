package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Reasons a peer's certificate is refused. Handshake errors wrap one of
// them (test with errors.Is) so callers can count them apart.
var (
	// ErrNoPeerCert: the peer presented no certificate.
	ErrNoPeerCert = errors.New("peer presented no certificate")
	// ErrUntrustedDomain: the peer's SPIFFE ID is in a trust domain we hold
	// no bundle for.
	ErrUntrustedDomain = errors.New("peer's trust domain is not trusted")
	// ErrUnknownAuthority: the chain does not lead to the bundle of the
	// peer's trust domain.
	ErrUnknownAuthority = errors.New("peer's certificate is signed by an unknown authority")
	// ErrExpired: the peer's certificate (or its chain) is expired or not
	// yet valid.
	ErrExpired = errors.New("peer's certificate is expired or not yet valid")
	// ErrNotSVID: the peer's certificate is not a valid X509-SVID.
	ErrNotSVID = errors.New("peer's certificate is not an X509-SVID")
	// ErrPeerMismatch: the server's SPIFFE ID is not the destination's.
	ErrPeerMismatch = errors.New("peer's SPIFFE ID is not the expected one")
)

// VerifyPeer verifies a peer's raw certificate chain (leaf first) as an
// X509-SVID against bundles and returns its SPIFFE ID. Errors wrap one of
// ErrNoPeerCert, ErrNotSVID, ErrUntrustedDomain, ErrUnknownAuthority or
// ErrExpired.
func VerifyPeer(rawCerts [][]byte, bundles x509bundle.Source) (spiffeid.ID, error) {
	if len(rawCerts) == 0 {
		return spiffeid.ID{}, ErrNoPeerCert
	}
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for _, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrNotSVID, err)
		}
		certs = append(certs, c)
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrNotSVID, err)
	}
	if _, err := bundles.GetX509BundleForTrustDomain(id.TrustDomain()); err != nil {
		return id, fmt.Errorf("%w: %s presents an ID of trust domain %s, for which this node holds no trust bundle (a foreign domain must be federated)",
			ErrUntrustedDomain, id, id.TrustDomain().Name())
	}
	if _, _, err := x509svid.Verify(certs, bundles); err != nil {
		var inv x509.CertificateInvalidError
		var ua x509.UnknownAuthorityError
		switch {
		case errors.As(err, &inv) && inv.Reason == x509.Expired:
			return id, fmt.Errorf("%w: %s: %w", ErrExpired, id, err)
		case errors.As(err, &ua):
			return id, fmt.Errorf("%w: %s: %w", ErrUnknownAuthority, id, err)
		default:
			return id, fmt.Errorf("%w: %s: %w", ErrNotSVID, id, err)
		}
	}
	return id, nil
}

// PeerID returns the SPIFFE ID of a TLS connection's verified peer. Call
// it only on connections made with ClientConfig or ServerConfig, which
// verified the chain during the handshake.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, ErrNoPeerCert
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrNotSVID, err)
	}
	return id, nil
}

// certificate turns an SVID into a tls.Certificate (leaf first, with the
// intermediates).
func certificate(s *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, x := range s.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// ClientConfig returns the TLS configuration of an HBONE client: TLS 1.3
// only, DefaultKeyExchange, ALPN h2, no SNI, presenting svid (always, whatever CAs the server
// names) and accepting only a server whose X509-SVID verifies against
// bundles and names want.
func ClientConfig(svid *x509svid.SVID, bundles x509bundle.Source, want spiffeid.ID) *tls.Config {
	cert := certificate(svid)
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: DefaultKeyExchange(),
		NextProtos:       []string{ALPN},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		},
		// Standard hostname verification does not apply to SPIFFE IDs; the
		// chain and the ID are verified below.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := VerifyPeer(raw, bundles)
			if err != nil {
				return err
			}
			if id != want {
				return fmt.Errorf("%w: got %s, want %s", ErrPeerMismatch, id, want)
			}
			return nil
		},
	}
}

// ServerSVIDFunc returns the SVID to present on a connection that arrived
// at local, the destination pod's address.
type ServerSVIDFunc func(ctx context.Context, local netip.Addr) (*x509svid.SVID, error)

// ServerConfig returns the TLS configuration of an HBONE server: TLS 1.3
// only, DefaultKeyExchange, ALPN h2 (and http/1.1, so that HTTP/1 clients get a readable
// refusal instead of a handshake failure), a certificate chosen from the
// connection's local address, and a required client X509-SVID that
// verifies against bundles.
func ServerConfig(svid ServerSVIDFunc, bundles x509bundle.Source) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: DefaultKeyExchange(),
		NextProtos:       []string{ALPN, "http/1.1"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			local, ok := addrOf(hello.Conn.LocalAddr())
			if !ok {
				return nil, fmt.Errorf("hbone: no local address on %v", hello.Conn.LocalAddr())
			}
			s, err := svid(hello.Context(), local.Addr())
			if err != nil {
				return nil, err
			}
			return certificate(s), nil
		},
		// RequestClientCert (not Require...) so that a missing certificate
		// reaches VerifyPeerCertificate and fails with ErrNoPeerCert.
		ClientAuth: tls.RequestClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := VerifyPeer(raw, bundles)
			return err
		},
	}
}

// addrOf converts a net.Addr of a TCP connection to an AddrPort.
func addrOf(a net.Addr) (netip.AddrPort, bool) {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	case nil:
		return netip.AddrPort{}, false
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
}

// AddrOf returns the address of a TCP endpoint as an AddrPort with IPv4
// unmapped.
func AddrOf(a net.Addr) (netip.AddrPort, bool) { return addrOf(a) }
