package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// mantlet runs the CLI in-process and returns exit code, stdout, stderr.
func mantlet(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	e, out, errb := testEnv()
	code := run(context.Background(), e, args)
	return code, out.String(), errb.String()
}

func TestCAInitAndIssueWriteAnSVIDThatGoSpiffeAccepts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		initArgs  []string
		td        string
		id        string
		wantChain int
	}{
		{"default trust domain, root only", nil, "cluster.local", "spiffe://cluster.local/ns/shop/sa/cart", 1},
		{"own trust domain, with an intermediate", []string{"--trust-domain", "mesh.example", "--intermediate"}, "mesh.example", "spiffe://mesh.example/ns/db/sa/pg", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, out := filepath.Join(t.TempDir(), "ca"), filepath.Join(t.TempDir(), "svid")
			code, stdout, stderr := mantlet(t, append([]string{"ca", "init", "--dir", dir}, tc.initArgs...)...)
			if code != 0 {
				t.Fatalf("ca init exited %d: %s", code, stderr)
			}
			if !strings.Contains(stdout, "Created a CA for trust domain "+tc.td) {
				t.Errorf("ca init said %q", stdout)
			}
			code, stdout, stderr = mantlet(t, "ca", "issue", "--dir", dir, "--spiffe-id", tc.id, "--out", out, "--ttl", "2h")
			if code != 0 {
				t.Fatalf("ca issue exited %d: %s", code, stderr)
			}
			if !strings.Contains(stdout, "Issued "+tc.id) {
				t.Errorf("ca issue said %q", stdout)
			}

			svid, err := x509svid.Load(filepath.Join(out, "svid.pem"), filepath.Join(out, "svid-key.pem"))
			if err != nil {
				t.Fatal(err)
			}
			if svid.ID.String() != tc.id || len(svid.Certificates) != tc.wantChain {
				t.Errorf("svid.pem holds %s with %d certificates, want %s with %d", svid.ID, len(svid.Certificates), tc.id, tc.wantChain)
			}
			leaf := svid.Certificates[0]
			if life := time.Until(leaf.NotAfter); life > 2*time.Hour || life < 2*time.Hour-time.Minute {
				t.Errorf("SVID valid for another %v, want about 2h", life)
			}
			bundle, err := x509bundle.Load(spiffeid.RequireTrustDomainFromString(tc.td), filepath.Join(out, "bundle.pem"))
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
				t.Fatalf("the SVID does not verify against bundle.pem: %v", err)
			}
			fi, err := os.Stat(filepath.Join(out, "svid-key.pem"))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("svid-key.pem mode %04o, want 0600", fi.Mode().Perm())
			}

			// Issuing again replaces the files with a new key.
			if code, _, stderr := mantlet(t, "ca", "issue", "--dir", dir, "--spiffe-id", tc.id, "--out", out); code != 0 {
				t.Fatalf("second ca issue exited %d: %s", code, stderr)
			}
			again, err := x509svid.Load(filepath.Join(out, "svid.pem"), filepath.Join(out, "svid-key.pem"))
			if err != nil {
				t.Fatal(err)
			}
			if again.Certificates[0].SerialNumber.Cmp(leaf.SerialNumber) == 0 {
				t.Error("second issue did not replace the SVID")
			}
			if entries, _ := os.ReadDir(out); len(entries) != 3 {
				t.Errorf("out directory has %d entries, want 3 (no temporary files left)", len(entries))
			}
		})
	}
}

func TestCAErrorsSayWhatIsWrong(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if code, _, stderr := mantlet(t, "ca", "init", "--dir", dir); code != 0 {
		t.Fatalf("ca init: %s", stderr)
	}
	out := t.TempDir()
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"init without --dir", []string{"ca", "init"}, 2, "mantlet ca init: --dir is required"},
		{"init over an existing CA", []string{"ca", "init", "--dir", dir}, 1, "mantlet ca: ca: init " + dir + ": a CA already exists there\n"},
		{"init with a bad trust domain", []string{"ca", "init", "--dir", filepath.Join(out, "x"), "--trust-domain", "Bad_TD!"}, 1, `--trust-domain "Bad_TD!": trust domain characters are limited`},
		{"issue for a foreign trust domain", []string{"ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://other.td/ns/a/sa/b", "--out", out}, 1,
			"mantlet ca: --spiffe-id spiffe://other.td/ns/a/sa/b: not in trust domain cluster.local of the CA in " + dir + "\n"},
		{"issue for the trust domain itself", []string{"ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://cluster.local", "--out", out}, 1, "a workload's ID needs a path"},
		{"issue for something that is no SPIFFE ID", []string{"ca", "issue", "--dir", dir, "--spiffe-id", "cart.shop", "--out", out}, 1, "--spiffe-id cart.shop: scheme is missing or invalid"},
		{"issue from a directory without a CA", []string{"ca", "issue", "--dir", out, "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b", "--out", out}, 1, "no CA here (run 'mantlet ca init')"},
		{"issue without --out", []string{"ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b"}, 2, "--out is required"},
		{"issue with a negative ttl", []string{"ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://cluster.local/ns/a/sa/b", "--out", out, "--ttl", "-1h"}, 1, "--ttl -1h0m0s: must be positive"},
		{"a stray argument", []string{"ca", "init", "--dir", dir, "extra"}, 2, `unexpected argument "extra"`},
		{"an unknown subcommand", []string{"ca", "sign"}, 2, `unknown subcommand "sign"`},
		{"no subcommand", []string{"ca"}, 2, "Usage: mantlet ca <subcommand>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := mantlet(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(stderr, tc.wantErr) {
				t.Fatalf("mantlet %s: exit %d, stderr:\n%s\nwant exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.wantCode, tc.wantErr)
			}
		})
	}
	if entries, _ := os.ReadDir(out); len(entries) != 0 {
		t.Errorf("failed commands left files in the out directory: %v", entries)
	}
}

func TestCASubcommandsAnswerHelp(t *testing.T) {
	for name := range caCommands {
		code, _, stderr := mantlet(t, "ca", name, "-h")
		if code != 0 || !strings.Contains(stderr, "Usage: mantlet ca "+name) {
			t.Errorf("mantlet ca %s -h: exit %d, stderr:\n%s", name, code, stderr)
		}
	}
}

func TestCAIssueAddsDNSAndIPNames(t *testing.T) {
	dir, out := filepath.Join(t.TempDir(), "ca"), t.TempDir()
	if code, _, stderr := mantlet(t, "ca", "init", "--dir", dir, "--intermediate"); code != 0 {
		t.Fatal(stderr)
	}
	code, stdout, stderr := mantlet(t, "ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/cart",
		"--out", out, "--dns", "cart.shop.svc,cart.example", "--ip", "198.19.1.10", "--ip", "2001:db8::1")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if !strings.Contains(stdout, "also valid for: cart.shop.svc, cart.example, 198.19.1.10, 2001:db8::1") {
		t.Errorf("stdout:\n%s", stdout)
	}
	svid, err := x509svid.Load(filepath.Join(out, "svid.pem"), filepath.Join(out, "svid-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	leaf := svid.Certificates[0]
	if svid.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" || len(leaf.DNSNames) != 2 || len(leaf.IPAddresses) != 2 {
		t.Errorf("SVID %s with DNS %v, IP %v", svid.ID, leaf.DNSNames, leaf.IPAddresses)
	}
	for _, tc := range []struct{ flag, value, want string }{
		{"--dns", "*.shop.svc", "--dns/--ip: DNS name \"*.shop.svc\": want lower-case letters, digits and inner hyphens"},
		{"--ip", "cart", `--ip "cart": want an IPv4 or IPv6 address`},
	} {
		code, _, stderr := mantlet(t, "ca", "issue", "--dir", dir, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/cart", "--out", out, tc.flag, tc.value)
		if code != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%s %s: exit %d, %q; want %q", tc.flag, tc.value, code, stderr, tc.want)
		}
	}
}

func TestCARotateWalksThePhasesAndRefusesStepsOutOfOrder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if code, _, stderr := mantlet(t, "ca", "init", "--dir", dir); code != 0 {
		t.Fatal(stderr)
	}
	for _, tc := range []struct {
		args     []string
		wantCode int
		want     string
	}{
		{nil, 0, "rotation phase idle:"},
		{[]string{"activate"}, 1, "no rotation is prepared (run prepare first)"},
		{[]string{"prepare"}, 0, "Next: once every node trusts the new root"},
		{[]string{"prepare"}, 1, "a rotation is already prepared; activate it"},
		{[]string{"finish"}, 1, "the prepared root is not active yet"},
		{[]string{"activate"}, 0, "retired, still trusted"},
		{nil, 0, "rotation phase activated:"},
		{[]string{"finish"}, 0, "Finished: the trust bundle holds the active root only."},
		{[]string{"turn"}, 2, `unknown step "turn"`},
	} {
		code, stdout, stderr := mantlet(t, append([]string{"ca", "rotate", "--dir", dir}, tc.args...)...)
		if code != tc.wantCode || !strings.Contains(stdout+stderr, tc.want) {
			t.Fatalf("ca rotate %v: exit %d\n%s%s\nwant exit %d and %q", tc.args, code, stdout, stderr, tc.wantCode, tc.want)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 3 {
		t.Errorf("after the rotation the CA directory holds %d files, want 3", len(entries))
	}
}
