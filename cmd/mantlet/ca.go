package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
)

func init() {
	register(command{name: "ca", summary: "create a certificate authority and issue SVIDs from it", run: runCA})
}

// caCommands are the subcommands of 'mantlet ca'.
var caCommands = map[string]subcommand{
	"init":   {"create a CA (root key, optional intermediate) in a directory", runCAInit},
	"issue":  {"issue an X509-SVID (chain, key, bundle as PEM) from a CA directory, optionally with DNS and IP names", runCAIssue},
	"rotate": {"rotate a CA's root with an overlap: prepare, activate, finish (or show where it stands)", runCARotate},
}

func runCA(ctx context.Context, e *env, args []string) error {
	return group{name: "ca", commands: caCommands}.run(ctx, e, args)
}

// requireFlags prints an error and the usage when a required flag is
// empty.
func requireFlags(flags *flag.FlagSet, names ...string) error {
	for _, n := range names {
		if flags.Lookup(n).Value.String() == "" {
			fmt.Fprintf(flags.Output(), "%s: --%s is required\n", flags.Name(), n)
			flags.Usage()
			return errUsage
		}
	}
	if flags.NArg() > 0 {
		fmt.Fprintf(flags.Output(), "%s: unexpected argument %q\n", flags.Name(), flags.Arg(0))
		flags.Usage()
		return errUsage
	}
	return nil
}

func runCAInit(_ context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "ca init", "--dir DIR [--trust-domain TD] [--intermediate]")
	dir := flags.String("dir", "", "`DIR` to create the CA in: new or empty; it is made mode 0700, key files 0600")
	tdName := flags.String("trust-domain", identity.DefaultTrustDomain.Name(), "`TD`, the trust domain of the CA's identities")
	inter := flags.Bool("intermediate", false, "sign SVIDs with an intermediate certificate under the root")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	if err := requireFlags(flags, "dir"); err != nil {
		return err
	}
	td, err := spiffeid.TrustDomainFromString(*tdName)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", *tdName, err)
	}
	c, err := ca.Init(*dir, td, ca.Options{Intermediate: *inter})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "Created a CA for trust domain %s in %s.\n", td.Name(), *dir)
	fmt.Fprintf(e.stdout, "  root certificate: %s (expires %s)\n", filepath.Join(*dir, ca.RootCertFile), c.Root().NotAfter.UTC().Format(time.DateOnly))
	if *inter {
		fmt.Fprintf(e.stdout, "  intermediate:     %s\n", filepath.Join(*dir, ca.IntermediateFile))
	}
	fmt.Fprintf(e.stdout, "The trust bundle is the root certificate. Keep %s private: it holds the signing keys.\n", *dir)
	return nil
}

// Files written by 'mantlet ca issue'.
const (
	svidFile    = "svid.pem"
	svidKeyFile = "svid-key.pem"
	bundleFile  = "bundle.pem"
)

func runCAIssue(ctx context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "ca issue", "--dir DIR --spiffe-id ID --out OUTDIR [--ttl 24h] [--dns NAME]... [--ip ADDR]...")
	dir := flags.String("dir", "", "`DIR` of the CA, made by 'mantlet ca init'")
	idStr := flags.String("spiffe-id", "", "`ID` to issue, e.g. spiffe://cluster.local/ns/NS/sa/SA")
	out := flags.String("out", "", "`OUTDIR` to write "+svidFile+" (chain, leaf first), "+svidKeyFile+" (mode 0600) and "+bundleFile+" to")
	ttl := flags.Duration("ttl", identity.DefaultSVIDTTL, fmt.Sprintf("lifetime of the SVID (the CA caps it at %dh)", int(ca.DefaultMaxSVIDTTL.Hours())))
	var dnsNames, ipNames listFlag
	flags.Var(&dnsNames, "dns", "DNS `NAME` to add beside the SPIFFE ID, for TLS clients that verify a host name (repeat or comma-separate)")
	flags.Var(&ipNames, "ip", "IP `ADDR` to add beside the SPIFFE ID, for TLS clients that verify an address (repeat or comma-separate)")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	if err := requireFlags(flags, "dir", "spiffe-id", "out"); err != nil {
		return err
	}
	if *ttl <= 0 {
		return fmt.Errorf("--ttl %s: must be positive", *ttl)
	}
	names := ca.Names{DNSNames: dnsNames}
	for _, s := range ipNames {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("--ip %q: want an IPv4 or IPv6 address", s)
		}
		names.IPAddresses = append(names.IPAddresses, net.IP(a.Unmap().AsSlice()))
	}
	if err := names.Check(); err != nil {
		return fmt.Errorf("--dns/--ip: %w", err)
	}
	id, err := spiffeid.FromString(*idStr)
	if err != nil {
		return fmt.Errorf("--spiffe-id %s: %w", *idStr, err)
	}
	authority, err := ca.Load(*dir, ca.Options{})
	if err != nil {
		return err
	}
	if !id.MemberOf(authority.TrustDomain()) {
		return fmt.Errorf("--spiffe-id %s: not in trust domain %s of the CA in %s", id, authority.TrustDomain().Name(), *dir)
	}
	if id.Path() == "" {
		return fmt.Errorf("--spiffe-id %s: a workload's ID needs a path, e.g. %s/ns/NS/sa/SA", id, id)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()},
		DNSNames: names.DNSNames, IPAddresses: names.IPAddresses}, key)
	if err != nil {
		return fmt.Errorf("certificate request: %w", err)
	}
	chain, err := authority.SignCSRWithNames(ctx, csr, id, *ttl, names)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key: %w", err)
	}
	var chainPEM []byte
	for _, c := range chain {
		chainPEM = append(chainPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	var bundlePEM []byte
	for _, r := range authority.Roots() {
		bundlePEM = append(bundlePEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})

	if err := os.MkdirAll(*out, 0o755); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
		mode fs.FileMode
	}{
		{svidKeyFile, keyPEM, 0o600},
		{svidFile, chainPEM, 0o644},
		{bundleFile, bundlePEM, 0o644},
	} {
		if err := writeFileAtomic(filepath.Join(*out, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	leaf := chain[0]
	fmt.Fprintf(e.stdout, "Issued %s (serial %s), valid until %s.\n", id, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339))
	if len(leaf.DNSNames)+len(leaf.IPAddresses) > 0 {
		var also []string
		also = append(also, leaf.DNSNames...)
		for _, ip := range leaf.IPAddresses {
			also = append(also, ip.String())
		}
		fmt.Fprintf(e.stdout, "  also valid for: %s\n", strings.Join(also, ", "))
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore) - ca.Backdate; got < *ttl-time.Second {
		fmt.Fprintf(e.stdout, "Note: the CA shortened the lifetime to %s.\n", got.Round(time.Second))
	}
	fmt.Fprintf(e.stdout, "  %s  certificate chain, leaf first\n", filepath.Join(*out, svidFile))
	fmt.Fprintf(e.stdout, "  %s  private key (mode 0600)\n", filepath.Join(*out, svidKeyFile))
	fmt.Fprintf(e.stdout, "  %s  trust bundle of %s (%s)\n", filepath.Join(*out, bundleFile), authority.TrustDomain().Name(), count(len(authority.Roots()), "root"))
	return nil
}

// writeFileAtomic replaces path with data: a reader sees the old file or
// the new one, never a part, and a key is never readable beyond mode.
func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	err = errors.Join(tmp.Chmod(mode), write(tmp, data), tmp.Sync(), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func write(w io.Writer, b []byte) error {
	_, err := w.Write(b)
	return err
}

// count says n things: "1 root", "2 roots".
func count(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}

// rotateSteps are the steps of 'mantlet ca rotate', in order.
var rotateSteps = map[string]func(*ca.CA) (*ca.CA, error){
	"prepare":  (*ca.CA).Prepare,
	"activate": (*ca.CA).Activate,
	"finish":   (*ca.CA).Finish,
}

func runCARotate(ctx context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "ca rotate", "(--dir DIR | --secret NS/NAME (--kubeconfig F | --kubernetes)) [prepare | activate | finish]")
	dir := flags.String("dir", "", "`DIR` of the CA, made by 'mantlet ca init'; agents started with --ca-dir DIR follow it within seconds")
	secret := flags.String("secret", "", "the cluster CA's Secret (`NS/NAME`, as 'mantlet ca serve' keeps it) instead of --dir; its replicas follow within --reload")
	kubeconfig := flags.String("kubeconfig", "", "with --secret: reach the API server with this kubeconfig")
	inCluster := flags.Bool("kubernetes", false, "with --secret: reach the API server with the pod's service account")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	var step string
	if flags.NArg() > 0 {
		step = flags.Arg(0)
		if _, ok := rotateSteps[step]; !ok {
			fmt.Fprintf(flags.Output(), "ca rotate: unknown step %q: want prepare, activate or finish\n", step)
			flags.Usage()
			return errUsage
		}
		if flags.NArg() > 1 {
			fmt.Fprintf(flags.Output(), "ca rotate: unexpected argument %q\n", flags.Arg(1))
			flags.Usage()
			return errUsage
		}
	}
	if *secret != "" {
		if *dir != "" || (*kubeconfig == "") == !*inCluster {
			fmt.Fprintf(flags.Output(), "ca rotate: --secret needs one of --kubeconfig and --kubernetes, and no --dir\n")
			flags.Usage()
			return errUsage
		}
		return rotateSecret(ctx, e, *secret, *kubeconfig, step)
	}
	if *dir == "" {
		fmt.Fprintf(flags.Output(), "ca rotate: --dir or --secret is required\n")
		flags.Usage()
		return errUsage
	}
	c, err := ca.Load(*dir, ca.Options{})
	if err != nil {
		return err
	}
	if step != "" {
		if c, err = rotateSteps[step](c); err != nil {
			return err
		}
		files, err := c.Files()
		if err != nil {
			return err
		}
		if err := ca.WriteDir(*dir, files); err != nil {
			return err
		}
	}
	printRotation(e.stdout, c, step, "mantlet ca rotate --dir "+*dir)
	return nil
}

// printRotation says where c stands after step ("" when only asked) and
// what to do next; again is the command line without the step.
func printRotation(w io.Writer, c *ca.CA, step, again string) {
	switch step {
	case "prepare":
		fmt.Fprintln(w, "Prepared a new root. It is in the trust bundle; the old root still signs.")
	case "activate":
		fmt.Fprintln(w, "Activated the new root: it signs from now on. The old root stays in the trust bundle.")
	case "finish":
		fmt.Fprintln(w, "Finished: the trust bundle holds the active root only.")
	}
	fmt.Fprintf(w, "CA of trust domain %s, rotation phase %s:\n", c.TrustDomain().Name(), c.Phase())
	next := c.NextRoot()
	for _, r := range c.Roots() {
		role := "retired, still trusted"
		switch {
		case r.Equal(c.Root()):
			role = "active, signs SVIDs"
		case next != nil && r.Equal(next):
			role = "next, trusted, not signing yet"
		}
		fmt.Fprintf(w, "  root %s  expires %s  %s\n", identity.Fingerprint(r)[:16], r.NotAfter.UTC().Format(time.DateOnly), role)
	}
	switch c.Phase() {
	case ca.PhasePrepared:
		fmt.Fprintf(w, "Next: once every node trusts the new root ('mantlet certs' on a node lists its bundle), run '%s activate'.\n", again)
	case ca.PhaseActivated:
		fmt.Fprintf(w, "Next: once every node has renewed its SVIDs under the new root (within --svid-reissue-spread; 'mantlet certs' shows each SVID's root), run '%s finish'.\n", again)
	default:
		fmt.Fprintf(w, "To rotate the root, run '%s prepare'.\n", again)
	}
}
