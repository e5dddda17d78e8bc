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
	"maps"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Files of a CA directory (and keys of a Secret holding a CA). Key files
// are PKCS#8 "PRIVATE KEY" PEM, mode 0600; certificates are PEM.
// MetadataFile is written last: a directory without it holds no CA.
// RootCertFile is the trust bundle: the active root first, then the other
// roots trusted during a rotation. The Next files exist only while a
// rotation is prepared (the next root's certificate is then in the bundle).
const (
	MetadataFile            = "ca.json"
	RootCertFile            = "root.pem"
	RootKeyFile             = "root-key.pem"
	IntermediateFile        = "intermediate.pem"
	IntermediateKeyFile     = "intermediate-key.pem"
	NextRootKeyFile         = "next-root-key.pem"
	NextIntermediateFile    = "next-intermediate.pem"
	NextIntermediateKeyFile = "next-intermediate-key.pem"
)

// fileNames are the files a CA may have, in the order WriteDir writes
// them: keys and the next authority first, the bundle and the metadata
// last, so that a reader that sees a half-written directory fails to parse
// it rather than reading a wrong CA.
var fileNames = []string{
	NextIntermediateKeyFile, NextIntermediateFile, NextRootKeyFile,
	IntermediateKeyFile, IntermediateFile, RootKeyFile, RootCertFile, MetadataFile,
}

func isKeyFile(name string) bool { return strings.HasSuffix(name, "-key.pem") }

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

// Files is a CA as named files: the content of a CA directory, or the data
// of a Kubernetes Secret that holds one (the same names as keys).
type Files map[string][]byte

// Files returns the CA as the files Init writes and Parse reads.
func (c *CA) Files() (Files, error) {
	md := metadata{Version: metadataVersion, TrustDomain: c.td.Name(), Intermediate: c.active.inter != nil, Created: c.created.UTC()}
	mdJSON, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("ca: metadata: %w", err)
	}
	f := Files{MetadataFile: append(mdJSON, '\n')}
	var bundle []byte
	for _, r := range c.roots {
		bundle = append(bundle, encodeCert(r)...)
	}
	f[RootCertFile] = bundle
	put := func(name string, k crypto.Signer) error {
		b, err := encodeKey(k)
		if err != nil {
			return fmt.Errorf("ca: %s: %w", name, err)
		}
		f[name] = b
		return nil
	}
	if err := put(RootKeyFile, c.active.rootKey); err != nil {
		return nil, err
	}
	if c.active.inter != nil {
		f[IntermediateFile] = encodeCert(c.active.inter)
		if err := put(IntermediateKeyFile, c.active.interKey); err != nil {
			return nil, err
		}
	}
	if c.next != nil {
		if err := put(NextRootKeyFile, c.next.rootKey); err != nil {
			return nil, err
		}
		if c.next.inter != nil {
			f[NextIntermediateFile] = encodeCert(c.next.inter)
			if err := put(NextIntermediateKeyFile, c.next.interKey); err != nil {
				return nil, err
			}
		}
	}
	return f, nil
}

// Equal says whether two sets of files have the same names and contents.
func (f Files) Equal(g Files) bool {
	return maps.EqualFunc(f, g, bytes.Equal)
}

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
	files, err := c.Files()
	if err != nil {
		return nil, err
	}
	var written []string
	for _, name := range fileNames {
		b, ok := files[name]
		if !ok {
			continue
		}
		if err := writeNew(filepath.Join(dir, name), b, fileMode(name)); err != nil {
			for _, w := range written {
				os.Remove(w)
			}
			return nil, fmt.Errorf("ca: init %s: %w", dir, err)
		}
		written = append(written, filepath.Join(dir, name))
	}
	return c, nil
}

func fileMode(name string) fs.FileMode {
	if isKeyFile(name) {
		return 0o600
	}
	return 0o644
}

// WriteDir makes dir hold the CA of files (after a rotation step, say):
// each file is replaced atomically, in an order that keeps a reader of
// the directory from ever parsing a mix of the old and the new CA, and
// the CA's files that files lacks are removed. Files that are no CA's are
// left alone.
func WriteDir(dir string, files Files) error {
	for _, name := range fileNames {
		b, ok := files[name]
		if !ok {
			continue
		}
		old, err := os.ReadFile(filepath.Join(dir, name))
		if err == nil && bytes.Equal(old, b) {
			continue
		}
		if err := writeFileAtomic(filepath.Join(dir, name), b, fileMode(name)); err != nil {
			return fmt.Errorf("ca: write %s: %w", dir, err)
		}
	}
	for _, name := range fileNames {
		if _, ok := files[name]; ok {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ca: write %s: %w", dir, err)
		}
	}
	return nil
}

// writeFileAtomic replaces path with data: a reader sees the old file or
// the new one, never a part, and a key is never readable beyond mode.
func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	_, werr := tmp.Write(data)
	err = errors.Join(tmp.Chmod(mode), werr, tmp.Sync(), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	return err
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

// Load reads the CA that Init persisted in dir (ReadDir, then Parse):
// key files must not be readable by group or others, and the files must
// make a CA, as Parse checks. Options.Intermediate and Options.RootTTL are
// ignored. A directory without a CA gives an error wrapping
// fs.ErrNotExist.
func Load(dir string, opts Options) (*CA, error) {
	f, err := ReadDir(dir)
	if err == nil {
		var c *CA
		if c, err = parse(f, opts); err == nil {
			return c, nil
		}
	}
	return nil, fmt.Errorf("ca: load %s: %w", dir, err)
}

// ReadDir reads the files of the CA in dir (those of the names above; the
// directory may hold others). Key files must not be readable by group or
// others (like ssh, it refuses rather than warns). A directory without
// the metadata file gives an error wrapping fs.ErrNotExist.
func ReadDir(dir string) (Files, error) {
	f := Files{}
	for _, name := range fileNames {
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			if name == MetadataFile {
				return nil, fmt.Errorf("no CA here (run 'mantlet ca init'): %w", err)
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		if isKeyFile(name) {
			fi, err := os.Stat(path)
			if err != nil {
				return nil, err
			}
			if perm := fi.Mode().Perm(); perm&0o077 != 0 {
				return nil, fmt.Errorf("%s: mode %04o lets others read the key; want 0600 (chmod 600 %s)", name, perm, path)
			}
		}
		f[name] = b
	}
	return f, nil
}

// Parse reads a CA from its files and checks them: the metadata must be of
// a version this mantlet reads; every certificate of the bundle must be a
// self-signed CA certificate for the recorded trust domain; the root key
// must match one of them (the active root), the intermediate (if the
// metadata says there is one) must be signed by it and match its key; a
// prepared rotation's next root key must match another root of the
// bundle, and its intermediate be signed by that root.
func Parse(f Files, opts Options) (*CA, error) {
	c, err := parse(f, opts)
	if err != nil {
		return nil, fmt.Errorf("ca: parse: %w", err)
	}
	return c, nil
}

func parse(f Files, opts Options) (*CA, error) {
	opts = opts.withDefaults()
	mdJSON, ok := f[MetadataFile]
	if !ok {
		return nil, fmt.Errorf("no CA here (no %s; run 'mantlet ca init'): %w", MetadataFile, fs.ErrNotExist)
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
	roots, err := parseCerts(f, RootCertFile)
	if err != nil {
		return nil, err
	}
	for i, root := range roots {
		where := RootCertFile
		if len(roots) > 1 {
			where = fmt.Sprintf("%s, certificate %d", RootCertFile, i+1)
		}
		if err := checkCA(root, td); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		if err := root.CheckSignatureFrom(root); err != nil {
			return nil, fmt.Errorf("%s: not self-signed: %w", where, err)
		}
		for _, prev := range roots[:i] {
			if prev.Equal(root) {
				return nil, fmt.Errorf("%s: the same root twice", where)
			}
		}
	}
	active, err := parseAuthority(f, td, roots, RootKeyFile, IntermediateFile, IntermediateKeyFile, md.Intermediate)
	if err != nil {
		return nil, err
	}
	c := &CA{td: td, opts: opts, active: *active, created: md.Created}
	c.roots = append(c.roots, active.root)
	for _, r := range roots {
		if !r.Equal(active.root) {
			c.roots = append(c.roots, r)
		}
	}
	if _, ok := f[NextRootKeyFile]; ok {
		next, err := parseAuthority(f, td, roots, NextRootKeyFile, NextIntermediateFile, NextIntermediateKeyFile, md.Intermediate)
		if err != nil {
			return nil, err
		}
		if next.root.Equal(active.root) {
			return nil, fmt.Errorf("%s and %s are the same key", NextRootKeyFile, RootKeyFile)
		}
		c.next = next
	} else if _, ok := f[NextIntermediateFile]; ok {
		return nil, fmt.Errorf("%s without %s", NextIntermediateFile, NextRootKeyFile)
	}
	return c, nil
}

// parseAuthority finds the root of the bundle that keyName's key belongs
// to and, when withInter, reads the intermediate under it.
func parseAuthority(f Files, td spiffeid.TrustDomain, roots []*x509.Certificate, keyName, interName, interKeyName string, withInter bool) (*authority, error) {
	key, err := parseKey(f, keyName)
	if err != nil {
		return nil, err
	}
	a := &authority{rootKey: key}
	for _, r := range roots {
		if key.PublicKey.Equal(r.PublicKey) {
			a.root = r
		}
	}
	if a.root == nil {
		return nil, fmt.Errorf("%s does not match %s", keyName, RootCertFile)
	}
	if !withInter {
		return a, nil
	}
	inters, err := parseCerts(f, interName)
	if err != nil {
		return nil, err
	}
	inter := inters[0]
	if err := checkCA(inter, td); err != nil {
		return nil, fmt.Errorf("%s: %w", interName, err)
	}
	if err := inter.CheckSignatureFrom(a.root); err != nil {
		return nil, fmt.Errorf("%s: not signed by the root of %s: %w", interName, keyName, err)
	}
	interKey, err := parseKey(f, interKeyName)
	if err != nil {
		return nil, err
	}
	if !interKey.PublicKey.Equal(inter.PublicKey) {
		return nil, fmt.Errorf("%s does not match %s", interKeyName, interName)
	}
	a.inter, a.interKey = inter, interKey
	return a, nil
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

// parseCerts reads the CERTIFICATE blocks of a file: at least one, and
// nothing else.
func parseCerts(f Files, name string) ([]*x509.Certificate, error) {
	rest, ok := f[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%s: a %s PEM block where certificates belong", name, block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no CERTIFICATE PEM block", name)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, fmt.Errorf("%s: text after the last certificate", name)
	}
	return certs, nil
}

func parseKey(f Files, name string) (*ecdsa.PrivateKey, error) {
	keyPEM, ok := f[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: no PRIVATE KEY PEM block", name)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: not an ECDSA P-256 key", name)
	}
	return key, nil
}
