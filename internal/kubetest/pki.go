package kubetest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// certLifetime bounds every certificate of a run: long enough for any
// test, short enough that a leaked key is worth nothing.
const certLifetime = 24 * time.Hour

// pki is a run's throwaway credentials: a CA, the API server's serving
// certificate, the admin's client certificate and the service-account
// signing key. Keys are ECDSA P-256 (fast to make; kube-apiserver signs
// service-account tokens with ES256 then).
type pki struct {
	caCert    *x509.Certificate
	caKey     *ecdsa.PrivateKey
	caPEM     []byte
	adminCert []byte // PEM
	adminKey  []byte // PEM
}

// The files of a run's folder that the processes read.
const (
	caFile          = "ca.crt"
	servingCertFile = "apiserver.crt"
	servingKeyFile  = "apiserver.key"
	saKeyFile       = "sa.key"
	saPubFile       = "sa.pub"
)

// newPKI makes the credentials and writes what kube-apiserver reads into
// dir: the CA, the serving certificate for addrs and the names of the
// in-cluster service, and the service-account key pair. The admin's
// certificate and key stay in memory.
func newPKI(dir string, addrs []netip.Addr) (*pki, error) {
	p := &pki{}
	var err error
	if p.caKey, err = newKey(); err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "kubetest CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := sign(caTmpl, caTmpl, p.caKey, p.caKey)
	if err != nil {
		return nil, fmt.Errorf("kubetest: CA: %w", err)
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("kubetest: CA: %w", err)
	}
	p.caPEM = pemBlock("CERTIFICATE", der)

	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	for _, a := range addrs {
		serving.IPAddresses = append(serving.IPAddresses, net.IP(a.AsSlice()))
	}
	servingCert, servingKey, err := p.issue(serving)
	if err != nil {
		return nil, fmt.Errorf("kubetest: serving certificate: %w", err)
	}
	// system:masters is the group RBAC lets do anything, with no binding.
	p.adminCert, p.adminKey, err = p.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: AdminUser, Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("kubetest: admin certificate: %w", err)
	}
	saKey, err := newKey()
	if err != nil {
		return nil, err
	}
	saPriv, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, fmt.Errorf("kubetest: service-account key: %w", err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, fmt.Errorf("kubetest: service-account key: %w", err)
	}
	files := map[string][]byte{
		caFile:          p.caPEM,
		servingCertFile: servingCert,
		servingKeyFile:  servingKey,
		saKeyFile:       pemBlock("PRIVATE KEY", saPriv),
		saPubFile:       pemBlock("PUBLIC KEY", saPub),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return nil, fmt.Errorf("kubetest: write %s: %w", name, err)
		}
	}
	return p, nil
}

// issue signs a leaf certificate with the CA and returns it and its new
// key, as PEM.
func (p *pki) issue(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(certLifetime)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := sign(tmpl, p.caCert, key, p.caKey)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	return pemBlock("CERTIFICATE", der), pemBlock("EC PRIVATE KEY", keyDER), nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("kubetest: generate key: %w", err)
	}
	return k, nil
}

// sign gives tmpl a random serial number and signs it.
func sign(tmpl, parent *x509.Certificate, key *ecdsa.PrivateKey, parentKey crypto.Signer) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	return der, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
