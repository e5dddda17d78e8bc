package identity_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

var (
	tdA = spiffeid.RequireTrustDomainFromString("a.test")
	tdB = spiffeid.RequireTrustDomainFromString("b.test")
)

// bundlePEM returns the PEM bundle of a new CA of td.
func bundlePEM(t *testing.T, td spiffeid.TrustDomain) ([]byte, *x509bundle.Bundle) {
	t.Helper()
	c, err := ca.New(td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Bundle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pem, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return pem, b
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	// Write beside and rename, as a ConfigMap update or an operator's
	// editor does: the reader never sees half a file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestParseFederatedBundle(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want: "td file" or the error
	}{
		{"b.test=/etc/b.pem", "b.test /etc/b.pem"},
		{"b.test=b=c.pem", "b.test b=c.pem"},
		{"b.test", `federate "b.test": want <trust-domain>=<bundle file>, e.g. b.example=/etc/mantlet/b.example.pem`},
		{"=/etc/b.pem", `federate "=/etc/b.pem": want <trust-domain>=<bundle file>, e.g. b.example=/etc/mantlet/b.example.pem`},
		{"spiffe://b.test=/etc/b.pem", `federate "spiffe://b.test=/etc/b.pem": "spiffe://b.test": want a trust domain name such as b.example, not a SPIFFE ID`},
		{"B.test=/etc/b.pem", `federate "B.test=/etc/b.pem": trust domain "B.test": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			fb, err := identity.ParseFederatedBundle(tc.in)
			got := fb.TrustDomain.Name() + " " + fb.File
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestNewFederationRefusesBadConfigurations(t *testing.T) {
	dir := t.TempDir()
	pemB, _ := bundlePEM(t, tdB)
	good := filepath.Join(dir, "b.pem")
	writeFile(t, good, pemB)
	empty := filepath.Join(dir, "empty.pem")
	writeFile(t, empty, nil)
	garbage := filepath.Join(dir, "garbage.pem")
	writeFile(t, garbage, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	for _, tc := range []struct {
		name string
		fed  []identity.FederatedBundle
		want string
	}{
		{"the node's own trust domain", []identity.FederatedBundle{{TrustDomain: tdA, File: good}},
			"identity: federation: a.test is the node's own trust domain; its bundle comes from the CA, not from a federated file"},
		{"a domain given twice", []identity.FederatedBundle{{TrustDomain: tdB, File: good}, {TrustDomain: tdB, File: empty}},
			"identity: federation: trust domain b.test is given twice (" + good + " and " + empty + ")"},
		{"a missing file", []identity.FederatedBundle{{TrustDomain: tdB, File: filepath.Join(dir, "nope.pem")}},
			"identity: federated bundle of b.test: open " + filepath.Join(dir, "nope.pem") + ": no such file or directory"},
		{"an empty file", []identity.FederatedBundle{{TrustDomain: tdB, File: empty}},
			"identity: federated bundle of b.test: " + empty + ": no X.509 authority in it"},
		{"a file that is no certificate", []identity.FederatedBundle{{TrustDomain: tdB, File: garbage}},
			"identity: federated bundle of b.test: " + garbage + ": PEM bundle: x509bundle: cannot parse certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := identity.NewFederation(tdA, tc.fed, nil)
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("NewFederation: %v; want %s", err, tc.want)
			}
		})
	}
}

// TestFederationServesEachDomainItsOwnBundle checks the bundle source a
// node verifies peers with: its own domain's bundle from its CA, a
// federated domain's from its file (PEM or SPIFFE bundle JSON), and
// nothing for any other domain.
func TestFederationServesEachDomainItsOwnBundle(t *testing.T) {
	dir := t.TempDir()
	_, own := bundlePEM(t, tdA)
	_, bB := bundlePEM(t, tdB)
	tdC := spiffeid.RequireTrustDomainFromString("c.test")
	_, bC := bundlePEM(t, tdC)
	pemB, _ := bB.Marshal()
	writeFile(t, filepath.Join(dir, "b.pem"), pemB)
	jsonC, err := spiffebundle.FromX509Authorities(tdC, bC.X509Authorities()).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "c.json"), jsonC)
	fed, err := identity.NewFederation(tdA, []identity.FederatedBundle{
		{TrustDomain: tdC, File: filepath.Join(dir, "c.json")},
		{TrustDomain: tdB, File: filepath.Join(dir, "b.pem")},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	src := identity.TrustBundles(tdA, own, fed)
	for td, want := range map[spiffeid.TrustDomain]*x509bundle.Bundle{tdA: own, tdB: bB, tdC: bC} {
		got, err := src.GetX509BundleForTrustDomain(td)
		if err != nil || !got.Equal(x509bundle.FromX509Authorities(td, want.X509Authorities())) {
			t.Errorf("bundle of %s: %v, %v; want its CA's", td, got, err)
		}
	}
	if _, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("d.test")); !errors.Is(err, identity.ErrNotFederated) {
		t.Errorf("bundle of d.test: %v, want ErrNotFederated", err)
	}
	if got := fed.TrustDomains(); len(got) != 2 || got[0] != tdB || got[1] != tdC {
		t.Errorf("TrustDomains = %v, want [b.test c.test]", got)
	}
	if identity.TrustBundles(tdA, own, nil) != x509bundle.Source(own) {
		t.Error("without federation the node's own bundle source is not used as it is")
	}
}

// TestFederationReadsChangedFilesAndKeepsTheLastGoodBundle changes a
// federated bundle file the way an operator or a ConfigMap does: a new
// root is picked up by the next check and counted, a broken file leaves
// the last good bundle in force with the failure reported (and logged
// once), and a repaired file clears it.
func TestFederationReadsChangedFilesAndKeepsTheLastGoodBundle(t *testing.T) {
	file := filepath.Join(t.TempDir(), "b.pem")
	pem1, b1 := bundlePEM(t, tdB)
	writeFile(t, file, pem1)
	var logs bytes.Buffer
	fed, err := identity.NewFederation(tdA, []identity.FederatedBundle{{TrustDomain: tdB, File: file}}, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	current := func() *x509bundle.Bundle {
		b, err := fed.GetX509BundleForTrustDomain(tdB)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	info := func() identity.BundleInfo { return fed.Bundles()[0] }
	if n := fed.Check(); n != 0 || !current().Equal(b1) {
		t.Fatalf("an unchanged file: Check = %d, bundle changed: %v", n, !current().Equal(b1))
	}

	// Rotation on b.test's side: both roots, then only the new one.
	pem2, b2 := bundlePEM(t, tdB)
	writeFile(t, file, append(append([]byte{}, pem1...), pem2...))
	if n := fed.Check(); n != 1 || len(current().X509Authorities()) != 2 {
		t.Fatalf("Check = %d with %d roots; want 1 change, 2 roots", n, len(current().X509Authorities()))
	}
	writeFile(t, file, pem2)
	if n := fed.Check(); n != 1 || !current().Equal(b2) {
		t.Fatalf("Check = %d; want the new root alone", n)
	}
	if bi := info(); bi.Reloads != 2 || bi.Failures != 0 || !bi.Federated || bi.Source != file || len(bi.Roots) != 1 {
		t.Fatalf("Bundles = %+v; want 2 reloads, no failure, 1 root, from %s", bi, file)
	}

	// A broken file: the last good bundle stays.
	writeFile(t, file, []byte("not a certificate\n"))
	logs.Reset()
	fed.Check()
	fed.Check()
	if !current().Equal(b2) {
		t.Fatal("a broken file replaced the bundle")
	}
	if bi := info(); bi.Failures != 1 || !strings.Contains(bi.LastError, "no PEM blocks found") {
		t.Fatalf("Bundles = %+v; want 1 failure (the unchanged broken file is not parsed again)", bi)
	}
	if n := strings.Count(logs.String(), "federated trust bundle not read"); n != 1 {
		t.Fatalf("the broken file was logged %d times, want once:\n%s", n, logs.String())
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	fed.Check()
	fed.Check()
	if bi := info(); bi.Failures != 3 || !strings.Contains(bi.LastError, "no such file") || !current().Equal(b2) {
		t.Fatalf("Bundles = %+v; want 3 failures, the file missing, the last good bundle in use", bi)
	}

	writeFile(t, file, pem1)
	if n := fed.Check(); n != 1 || !current().Equal(b1) {
		t.Fatalf("Check = %d; want the repaired file's bundle", n)
	}
	if bi := info(); bi.Failures != 0 || bi.LastError != "" || bi.Reloads != 3 {
		t.Fatalf("Bundles = %+v; want the failure cleared, 3 reloads", bi)
	}
}

// TestFederationRunPollsUntilCancelled checks that Run picks up a change
// by itself and returns when its context ends.
func TestFederationRunPollsUntilCancelled(t *testing.T) {
	file := filepath.Join(t.TempDir(), "b.pem")
	pem1, _ := bundlePEM(t, tdB)
	writeFile(t, file, pem1)
	fed, err := identity.NewFederation(tdA, []identity.FederatedBundle{{TrustDomain: tdB, File: file}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fed.Run(ctx, 10*time.Millisecond) }()
	pem2, b2 := bundlePEM(t, tdB)
	writeFile(t, file, pem2)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if b, _ := fed.GetX509BundleForTrustDomain(tdB); b.Equal(b2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Run did not pick up the changed file")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

// FuzzParseBundle feeds the federated bundle parser arbitrary files: it
// must never panic, and whatever it accepts is a non-empty bundle of CA
// certificates of the trust domain asked for.
func FuzzParseBundle(f *testing.F) {
	c, err := ca.New(tdB, ca.Options{})
	if err != nil {
		f.Fatal(err)
	}
	b, _ := c.Bundle(context.Background())
	pem, _ := b.Marshal()
	js, _ := spiffebundle.FromX509Authorities(tdB, b.X509Authorities()).Marshal()
	f.Add(pem)
	f.Add(js)
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := identity.ParseBundle(tdB, data)
		if err != nil {
			return
		}
		if got.TrustDomain() != tdB || got.Empty() {
			t.Fatalf("accepted a bundle of %s with %d authorities", got.TrustDomain(), len(got.X509Authorities()))
		}
		for _, a := range got.X509Authorities() {
			if !a.IsCA {
				t.Fatalf("accepted a certificate that is not a CA: %s", a.Subject)
			}
		}
	})
}
