package ca_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity/ca"
)

func TestInitPersistsACAThatLoadReadsBack(t *testing.T) {
	for _, tc := range []struct {
		name         string
		intermediate bool
		wantFiles    []string
	}{
		{"root only", false, []string{"ca.json", "root-key.pem", "root.pem"}},
		{"with an intermediate", true, []string{"ca.json", "intermediate-key.pem", "intermediate.pem", "root-key.pem", "root.pem"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ca")
			created, err := ca.Init(dir, td, ca.Options{Intermediate: tc.intermediate})
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(dir)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o700 {
				t.Errorf("directory mode = %04o, want 0700", fi.Mode().Perm())
			}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
				info, _ := e.Info()
				want := fs.FileMode(0o644)
				if strings.HasSuffix(e.Name(), "-key.pem") {
					want = 0o600
				}
				if got := info.Mode().Perm(); got&^want != 0 {
					t.Errorf("%s mode = %04o, want at most %04o", e.Name(), got, want)
				}
			}
			if strings.Join(names, " ") != strings.Join(tc.wantFiles, " ") {
				t.Errorf("files = %v, want %v", names, tc.wantFiles)
			}

			loaded, err := ca.Load(dir, ca.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if loaded.TrustDomain() != td {
				t.Errorf("loaded trust domain %s, want %s", loaded.TrustDomain(), td)
			}
			if !loaded.Root().Equal(created.Root()) {
				t.Error("loaded root differs from the created one")
			}
			if len(loaded.Intermediates()) != len(created.Intermediates()) {
				t.Errorf("loaded %d intermediates, created %d", len(loaded.Intermediates()), len(created.Intermediates()))
			}
			// The loaded CA signs SVIDs that the created CA's bundle trusts.
			chain, err := loaded.SignCSR(context.Background(), csrFor(t, newKey(t), nil), podID, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			bundle, _ := created.Bundle(context.Background())
			if _, _, err := x509svid.Verify(chain, bundle); err != nil {
				t.Fatalf("SVID of the loaded CA does not verify against the original bundle: %v", err)
			}
		})
	}
}

func TestInitNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	if _, err := ca.Init(dir, td, ca.Options{}); err != nil {
		t.Fatalf("Init into an existing empty directory: %v", err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, ca.RootKeyFile))
	if _, err := ca.Init(dir, td, ca.Options{}); !errors.Is(err, ca.ErrExists) {
		t.Fatalf("second Init = %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, ca.RootKeyFile))
	if string(before) != string(after) {
		t.Fatal("second Init changed the root key")
	}

	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "notes.txt"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := ca.Init(other, td, ca.Options{})
	if err == nil || !strings.Contains(err.Error(), "not empty (it has notes.txt)") {
		t.Fatalf("Init into a directory with other files = %v, want a 'not empty' error", err)
	}
}

func TestLoadRefuses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		spoil   func(t *testing.T, dir string)
		wantErr string
	}{
		{"a directory without a CA", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, ca.MetadataFile)) }, "no CA here"},
		{"a key readable by others", func(t *testing.T, dir string) { os.Chmod(filepath.Join(dir, ca.RootKeyFile), 0o644) }, "root-key.pem: mode 0644 lets others read the key"},
		{"a key that belongs to another certificate", func(t *testing.T, dir string) {
			other := filepath.Join(t.TempDir(), "other")
			if _, err := ca.Init(other, td, ca.Options{}); err != nil {
				t.Fatal(err)
			}
			copyFile(t, filepath.Join(other, ca.RootKeyFile), filepath.Join(dir, ca.RootKeyFile))
		}, "root-key.pem does not match root.pem"},
		{"metadata naming another trust domain", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, ca.MetadataFile), `{"version":1,"trust_domain":"other.td","intermediate":false}`)
		}, "root.pem: does not name trust domain other.td"},
		{"metadata of a future version", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, ca.MetadataFile), `{"version":7,"trust_domain":"cluster.local"}`)
		}, "ca.json: version 7"},
		{"a missing intermediate", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, ca.MetadataFile), `{"version":1,"trust_domain":"cluster.local","intermediate":true}`)
		}, "intermediate.pem: file does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ca")
			if _, err := ca.Init(dir, td, ca.Options{}); err != nil {
				t.Fatal(err)
			}
			tc.spoil(t, dir)
			_, err := ca.Load(dir, ca.Options{})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Load = %v, want an error containing %q", err, tc.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "ca: load "+dir+": ") {
				t.Errorf("error %q does not name the directory", err)
			}
		})
	}
	if _, err := ca.Load(t.TempDir(), ca.Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of an empty directory = %v, want fs.ErrNotExist", err)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(b))
}
