package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Files of a CA directory. Key files are PKCS#8 "PRIVATE KEY" PEM, mode
// 0600; certificates are PEM. MetadataFile is written last: a directory
// without it holds no CA.
const (
	MetadataFile        = "ca.json"
	RootCertFile        = "root.pem"
	RootKeyFile         = "root-key.pem"
	IntermediateFile    = "intermediate.pem"
	IntermediateKeyFile = "intermediate-key.pem"
)

// metadata is the content of MetadataFile.
type metadata struct {
	Version      int       `json:"version"`
	TrustDomain  string    `json:"trust_domain"`
	Intermediate bool      `json:"intermediate"`
	Created      time.Time `json:"created"`
}

const metadataVersion = 1

// ErrExists is returned by Init when the directory already holds a CA.
var ErrExists = errors.New("a CA already exists there")

// Init creates a CA for td with fresh keys and persists it to dir: the
// directory is created with mode 0700 (an existing one must be empty and
// is set to 0700), key files get mode 0600. It never overwrites: when dir
// already holds a CA it returns an error wrapping ErrExists, when it holds
// other files an error saying so. If writing fails half-way, the files
// written are removed again.
func Init(dir string, td spiffeid.TrustDomain, opts Options) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, MetadataFile)); err == nil {
		return nil, fmt.Errorf("ca: init %s: %w", dir, ErrExists)
	}
	if err := prepareDir(dir); err != nil {
		return nil, fmt.Errorf("ca: init %s: %w", dir, err)
	}
	c, err := New(td, opts)
	if err != nil {
		return nil, err
	}
	md := metadata{Version: metadataVersion, TrustDomain: td.Name(), Intermediate: c.interKey != nil, Created: c.opts.Now().UTC()}
	mdJSON, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("ca: init %s: metadata: %w", dir, err)
	}
	files := []pemFile{
		{RootKeyFile, 0o600, func() ([]byte, error) { return encodeKey(c.rootKey) }},
		{RootCertFile, 0o644, func() ([]byte, error) { return encodeCert(c.root), nil }},
	}
	if c.interKey != nil {
		files = append(files,
			pemFile{IntermediateKeyFile, 0o600, func() ([]byte, error) { return encodeKey(c.interKey) }},
			pemFile{IntermediateFile, 0o644, func() ([]byte, error) { return encodeCert(c.chain[0]), nil }})
	}
	files = append(files, pemFile{MetadataFile, 0o644, func() ([]byte, error) { return append(mdJSON, '\n'), nil }})

	var written []string
	for _, f := range files {
		b, err := f.data()
		if err == nil {
			err = writeNew(filepath.Join(dir, f.name), b, f.mode)
		}
		if err != nil {
			for _, w := range written {
				os.Remove(w)
			}
			return nil, fmt.Errorf("ca: init %s: %w", dir, err)
		}
		written = append(written, filepath.Join(dir, f.name))
	}
	return c, nil
}

// pemFile is one file Init writes.
type pemFile struct {
	name string
	mode fs.FileMode
	data func() ([]byte, error)
}

// prepareDir creates dir with mode 0700, or checks that an existing dir is
// empty and sets its mode to 0700.
func prepareDir(dir string) error {
	err := os.Mkdir(dir, 0o700)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrExist) {
		if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
			return err
		}
		return os.Mkdir(dir, 0o700)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if len(entries) > 0 {
		return fmt.Errorf("directory is not empty (it has %s); give an empty or new directory", entries[0].Name())
	}
	return os.Chmod(dir, 0o700)
}

// writeNew writes a file that must not exist yet.
func writeNew(path string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func encodeCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func encodeKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// Load reads the CA that Init persisted in dir. It checks what it reads:
// key files must not be readable by group or others, each key must match
// its certificate, the root must be a self-signed CA certificate for the
// trust domain recorded in the directory, and the intermediate (if any)
// must be signed by the root. Options.Intermediate and Options.RootTTL are
// ignored. A directory without a CA gives an error wrapping
// fs.ErrNotExist.
func Load(dir string, opts Options) (*CA, error) {
	c, err := load(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("ca: load %s: %w", dir, err)
	}
	return c, nil
}

func load(dir string, opts Options) (*CA, error) {
	opts = opts.withDefaults()
	mdJSON, err := os.ReadFile(filepath.Join(dir, MetadataFile))
	if err != nil {
		return nil, fmt.Errorf("no CA here (run 'mantlet ca init'): %w", err)
	}
	var md metadata
	dec := json.NewDecoder(bytes.NewReader(mdJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&md); err != nil {
		return nil, fmt.Errorf("%s: %w", MetadataFile, err)
	}
	if md.Version != metadataVersion {
		return nil, fmt.Errorf("%s: version %d, this mantlet reads version %d", MetadataFile, md.Version, metadataVersion)
	}
	td, err := spiffeid.TrustDomainFromString(md.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("%s: trust domain: %w", MetadataFile, err)
	}
	root, rootKey, err := loadPair(dir, RootCertFile, RootKeyFile)
	if err != nil {
		return nil, err
	}
	if err := checkCA(root, td); err != nil {
		return nil, fmt.Errorf("%s: %w", RootCertFile, err)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("%s: not self-signed: %w", RootCertFile, err)
	}
	c := &CA{td: td, opts: opts, root: root, rootKey: rootKey, signer: rootKey, issuer: root}
	if md.Intermediate {
		inter, interKey, err := loadPair(dir, IntermediateFile, IntermediateKeyFile)
		if err != nil {
			return nil, err
		}
		if err := checkCA(inter, td); err != nil {
			return nil, fmt.Errorf("%s: %w", IntermediateFile, err)
		}
		if err := inter.CheckSignatureFrom(root); err != nil {
			return nil, fmt.Errorf("%s: not signed by the root: %w", IntermediateFile, err)
		}
		c.signer, c.issuer, c.chain, c.interKey = interKey, inter, []*x509.Certificate{inter}, interKey
	}
	return c, nil
}

func checkCA(cert *x509.Certificate, td spiffeid.TrustDomain) error {
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("not a CA certificate")
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != td.IDString() {
		return fmt.Errorf("does not name trust domain %s (URI SANs %v)", td, cert.URIs)
	}
	return nil
}

func loadPair(dir, certName, keyName string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, certName))
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("%s: no CERTIFICATE PEM block", certName)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", certName, err)
	}
	keyPath := filepath.Join(dir, keyName)
	fi, err := os.Stat(keyPath)
	if err != nil {
		return nil, nil, err
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, nil, fmt.Errorf("%s: mode %04o lets others read the key; want 0600 (chmod 600 %s)", keyName, perm, keyPath)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, err
	}
	block, _ = pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, nil, fmt.Errorf("%s: no PRIVATE KEY PEM block", keyName)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyName, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, nil, fmt.Errorf("%s: not an ECDSA P-256 key", keyName)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, nil, fmt.Errorf("%s does not match %s", keyName, certName)
	}
	return cert, key, nil
}
