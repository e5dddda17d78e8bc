package ca_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/identity/ca"
)

// sign has c sign a fresh key for podID.
func sign(t *testing.T, c *ca.CA) []*x509.Certificate {
	t.Helper()
	chain, err := c.SignCSR(context.Background(), csrFor(t, newKey(t), nil), podID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return chain
}

func verifies(c *ca.CA, chain []*x509.Certificate) bool {
	b, _ := c.Bundle(context.Background())
	_, _, err := x509svid.Verify(chain, b, x509svid.WithTime(t0))
	return err == nil
}

func TestRotationKeepsOldAndNewSVIDsTrustedUntilFinished(t *testing.T) {
	for _, inter := range []bool{false, true} {
		t.Run(map[bool]string{false: "root only", true: "with an intermediate"}[inter], func(t *testing.T) {
			c0 := newCA(t, ca.Options{Intermediate: inter, Now: fixedClock(t0)})
			old := sign(t, c0)
			if c0.Phase() != ca.PhaseIdle {
				t.Fatalf("a new CA is in phase %s", c0.Phase())
			}

			c1, err := c0.Prepare()
			if err != nil {
				t.Fatal(err)
			}
			if c1.Phase() != ca.PhasePrepared || len(c1.Roots()) != 2 || !c1.Root().Equal(c0.Root()) || c1.NextRoot() == nil {
				t.Fatalf("prepared: phase %s, %d roots, same active root %v", c1.Phase(), len(c1.Roots()), c1.Root().Equal(c0.Root()))
			}
			if !verifies(c1, sign(t, c1)) || !verifies(c1, old) {
				t.Error("prepared: SVIDs of the old root do not verify")
			}
			if len(c0.Roots()) != 1 {
				t.Error("Prepare changed the CA it was called on")
			}

			c2, err := c1.Activate()
			if err != nil {
				t.Fatal(err)
			}
			renewed := sign(t, c2)
			if c2.Phase() != ca.PhaseActivated || !c2.Root().Equal(c1.NextRoot()) || !c2.Roots()[0].Equal(c2.Root()) {
				t.Fatalf("activated: phase %s, active root is the prepared one: %v", c2.Phase(), c2.Root().Equal(c1.NextRoot()))
			}
			if !verifies(c2, old) || !verifies(c2, renewed) || !verifies(c1, renewed) {
				t.Error("activated: old and new SVIDs must verify against the bundles of both phases")
			}
			if verifies(c0, renewed) {
				t.Error("an SVID of the new root verifies against the bundle before the rotation")
			}
			if got := c2.RetiredRoots(); len(got) != 1 || !got[0].Equal(c0.Root()) {
				t.Errorf("retired roots = %d, want the old root", len(got))
			}

			c3, err := c2.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if c3.Phase() != ca.PhaseIdle || len(c3.Roots()) != 1 || !verifies(c3, renewed) || verifies(c3, old) {
				t.Errorf("finished: phase %s, %d roots; new SVID verifies %v, old %v (want true, false)",
					c3.Phase(), len(c3.Roots()), verifies(c3, renewed), verifies(c3, old))
			}
		})
	}
}

func TestRotationStepsOutOfOrderAreRefused(t *testing.T) {
	c := newCA(t, ca.Options{Now: fixedClock(t0)})
	if _, err := c.Activate(); !errors.Is(err, ca.ErrRotationStep) {
		t.Errorf("Activate without Prepare = %v", err)
	}
	p, err := c.Prepare()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Prepare(); !errors.Is(err, ca.ErrRotationStep) {
		t.Errorf("Prepare twice = %v", err)
	}
	if _, err := p.Finish(); !errors.Is(err, ca.ErrRotationStep) {
		t.Errorf("Finish before Activate = %v", err)
	}
	if f, err := c.Finish(); err != nil || len(f.Roots()) != 1 {
		t.Errorf("Finish of an idle CA = %v; want no change", err)
	}
}

// TestEveryRotationStepSurvivesFilesAndHalfWrittenDirectories: each step's
// CA reads back from its files; and a reader that catches a directory
// half-way through WriteDir gets the old CA, the new one, or an error,
// never a mix.
func TestEveryRotationStepSurvivesFilesAndHalfWrittenDirectories(t *testing.T) {
	for _, inter := range []bool{false, true} {
		c := newCA(t, ca.Options{Intermediate: inter, Now: fixedClock(t0)})
		steps := []func(*ca.CA) (*ca.CA, error){(*ca.CA).Prepare, (*ca.CA).Activate, (*ca.CA).Finish, (*ca.CA).Prepare, (*ca.CA).Activate}
		for i, step := range steps {
			n, err := step(c)
			if err != nil {
				t.Fatal(err)
			}
			from, to := files(t, c), files(t, n)
			back, err := ca.Parse(to, ca.Options{})
			if err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
			if !files(t, back).Equal(to) {
				t.Fatalf("step %d: the parsed CA writes other files", i)
			}
			for j, state := range halfWritten(from, to) {
				got, err := ca.Parse(state, ca.Options{})
				if err != nil {
					continue
				}
				if g := files(t, got); !g.Equal(from) && !g.Equal(to) {
					t.Errorf("intermediate %d of step %d (intermediate %v) parses as a CA that is neither the old nor the new", j, i, inter)
				}
			}
			c = n
		}
	}
}

func files(t *testing.T, c *ca.CA) ca.Files {
	t.Helper()
	f, err := c.Files()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// halfWritten lists the states a reader may see while WriteDir turns
// from into to: files replaced one at a time in WriteDir's order, then the
// stale ones removed.
func halfWritten(from, to ca.Files) []ca.Files {
	order := []string{ca.NextIntermediateKeyFile, ca.NextIntermediateFile, ca.NextRootKeyFile,
		ca.IntermediateKeyFile, ca.IntermediateFile, ca.RootKeyFile, ca.RootCertFile, ca.MetadataFile}
	cur := ca.Files{}
	for k, v := range from {
		cur[k] = v
	}
	var out []ca.Files
	snap := func() {
		s := ca.Files{}
		for k, v := range cur {
			s[k] = v
		}
		out = append(out, s)
	}
	for _, name := range order {
		if b, ok := to[name]; ok && !bytes.Equal(b, cur[name]) {
			cur[name] = b
			snap()
		}
	}
	for _, name := range order {
		if _, ok := to[name]; !ok {
			if _, had := cur[name]; had {
				delete(cur, name)
				snap()
			}
		}
	}
	return out
}

func TestLoadReadsEveryRootOfTheBundle(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(dir, td, ca.Options{Now: fixedClock(t0)})
	if err != nil {
		t.Fatal(err)
	}
	other := newCA(t, ca.Options{Now: fixedClock(t0)})
	// The active root need not come first.
	bundle := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: other.Root().Raw}), mustRead(t, filepath.Join(dir, ca.RootCertFile))...)
	writeFile(t, filepath.Join(dir, ca.RootCertFile), string(bundle))
	got, err := ca.Load(dir, ca.Options{Now: fixedClock(t0)})
	if err != nil {
		t.Fatal(err)
	}
	if roots := got.Roots(); len(roots) != 2 || !roots[0].Equal(c.Root()) || !roots[1].Equal(other.Root()) {
		t.Fatalf("roots = %d, want the active root then the other", len(roots))
	}
	if got.Phase() != ca.PhaseActivated {
		t.Errorf("phase %s, want activated (an older root is still trusted)", got.Phase())
	}
	if !verifies(got, sign(t, other)) || !verifies(got, sign(t, got)) {
		t.Error("the bundle does not trust both roots")
	}

	for _, tc := range []struct {
		name, content, want string
	}{
		{"the same root twice", string(bundle) + string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: other.Root().Raw})), "the same root twice"},
		{"a key among the roots", string(bundle) + string(mustRead(t, filepath.Join(dir, ca.RootKeyFile))), "a PRIVATE KEY PEM block where certificates belong"},
		{"a root of another trust domain", string(bundle) + string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: newForeignRoot(t).Raw})), "certificate 3: does not name trust domain cluster.local"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			writeFile(t, filepath.Join(dir, ca.RootCertFile), tc.content)
			if _, err := ca.Load(dir, ca.Options{}); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want %q", err, tc.want)
			}
		})
	}
}

func newForeignRoot(t *testing.T) *x509.Certificate {
	c, err := ca.New(otherTD, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return c.Root()
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDirFollowsRotationStepsAndKeepsTheLastGoodCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := ca.Init(dir, td, ca.Options{Intermediate: true}); err != nil {
		t.Fatal(err)
	}
	d, err := ca.OpenDir(dir, ca.Options{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	step := func(f func(*ca.CA) (*ca.CA, error)) *ca.CA {
		t.Helper()
		c, err := ca.Load(dir, ca.Options{})
		if err != nil {
			t.Fatal(err)
		}
		n, err := f(c)
		if err != nil {
			t.Fatal(err)
		}
		fs, err := n.Files()
		if err != nil {
			t.Fatal(err)
		}
		if err := ca.WriteDir(dir, fs); err != nil {
			t.Fatal(err)
		}
		if err := d.Check(); err != nil {
			t.Fatal(err)
		}
		return n
	}
	first := d.CA().Root()
	p := step((*ca.CA).Prepare)
	if b, _ := d.Bundle(context.Background()); len(b.X509Authorities()) != 2 {
		t.Fatalf("after prepare the bundle has %d roots, want 2", len(b.X509Authorities()))
	}
	if r, _ := d.SigningRoot(context.Background()); !r.Equal(first) {
		t.Fatal("prepare changed the signing root")
	}
	step((*ca.CA).Activate)
	if r, _ := d.SigningRoot(context.Background()); !r.Equal(p.NextRoot()) {
		t.Fatal("activate did not make the prepared root sign")
	}
	step((*ca.CA).Finish)
	if b, _ := d.Bundle(context.Background()); len(b.X509Authorities()) != 1 {
		t.Fatalf("after finish the bundle has %d roots, want 1", len(b.X509Authorities()))
	}
	for _, name := range []string{ca.NextRootKeyFile, ca.NextIntermediateFile, ca.NextIntermediateKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			t.Errorf("%s left behind after the rotation", name)
		}
	}

	// A broken directory keeps the last good CA in use.
	good := d.CA().Root()
	if err := os.Chmod(filepath.Join(dir, ca.RootKeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.Check(); err == nil || !strings.Contains(err.Error(), "lets others read the key") {
		t.Fatalf("Check of a broken directory = %v", err)
	}
	if !d.CA().Root().Equal(good) || d.LastError() == nil {
		t.Fatal("a broken directory replaced the CA in use")
	}
	if _, err := d.SignCSR(context.Background(), csrFor(t, newKey(t), nil), podID, time.Hour); err != nil {
		t.Fatalf("signing with the last good CA: %v", err)
	}
	os.Chmod(filepath.Join(dir, ca.RootKeyFile), 0o600)
	if err := d.Check(); err != nil || d.LastError() != nil {
		t.Fatalf("the repaired directory: %v", err)
	}

	// A CA of another trust domain is not taken.
	other := filepath.Join(t.TempDir(), "other")
	if _, err := ca.Init(other, otherTD, ca.Options{}); err != nil {
		t.Fatal(err)
	}
	fs, err := ca.ReadDir(other)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteDir(dir, fs); err != nil {
		t.Fatal(err)
	}
	if err := d.Check(); err == nil || !strings.Contains(err.Error(), "trust domain other.td") {
		t.Fatalf("a CA of another trust domain: %v", err)
	}
	if d.TrustDomain() != td {
		t.Fatal("the trust domain changed")
	}
}

func TestDirReadsAgainAtMostEverySecond(t *testing.T) {
	now := t0
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(dir, td, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, err := ca.OpenDir(dir, ca.Options{Now: func() time.Time { return now }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := c.Prepare()
	fs, _ := p.Files()
	if err := ca.WriteDir(dir, fs); err != nil {
		t.Fatal(err)
	}
	if n := len(d.CA().Roots()); n != 1 {
		t.Fatalf("read again at once: %d roots", n)
	}
	now = now.Add(ca.DefaultDirCheck)
	if n := len(d.CA().Roots()); n != 2 {
		t.Fatalf("after %v: %d roots, want 2", ca.DefaultDirCheck, n)
	}
	if !slices.ContainsFunc(d.CA().Roots(), p.NextRoot().Equal) {
		t.Fatal("the next root is not in the bundle")
	}
}
