package peerbench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/peerbench/peerbin"
	"github.com/mantlet/mantlet/internal/testbed"
)

// The peers: sidecar-style mutual TLS pairs, a client-side proxy in the
// client pod and a server-side proxy in each server pod.
const (
	Ghostunnel = "ghostunnel"
	Nginx      = "nginx"
)

// Peers lists the peers the bench knows, in the order it runs them.
var Peers = []string{Ghostunnel, Nginx}

// Ports of the peers: the server side listens on the server pod's IP, the
// client side on 127.0.0.1 of the client pod, one port per server pod.
const (
	ghostunnelServerPort = 15443 // the app's
	ghostunnelIperfPort  = 15453 // the iperf3 server's
	ghostunnelClientPort = 15101
	nginxServerPort      = 15444 // the app's; the iperf3 server's 10 more
	nginxClientPort      = 15201
)

// Where Debian's nginx and its stream module are.
const (
	nginxBinary       = "/usr/sbin/nginx"
	nginxStreamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"
)

// installTimeout bounds an apt-get install of nginx.
const installTimeout = 5 * time.Minute

// peerEnv is what starting a peer needs.
type peerEnv struct {
	mesh    *meshtest.Mesh
	dir     string // certificates and configurations
	client  *testbed.Pod
	servers []*testbed.Pod
	log     *slog.Logger
}

// credentials writes a certificate for pod (chain and key) and the
// mesh's trust bundle into dir and returns their paths, pod's SPIFFE ID
// and the DNS name in its certificate.
//
// The certificate is signed by the mesh's CA (the key in its directory, as
// identity/ca stores it) and carries pod's SPIFFE ID like the agents'
// SVIDs, plus a DNS name: ghostunnel and nginx verify the server's name
// (an IP has to be in the certificate, or a name given to them), which an
// X509-SVID does not carry. ghostunnel then also checks the SPIFFE ID.
func (e *peerEnv) credentials(pod *testbed.Pod) (cert, key, bundle string, id spiffeid.ID, dns string, err error) {
	id, err = identity.WorkloadID(e.mesh.TrustDomain(), pod.Namespace, pod.ServiceAccount)
	if err != nil {
		return "", "", "", id, "", fmt.Errorf("peerbench: identity of %s: %w", pod.Name, err)
	}
	dns = pod.Name + "." + pod.Namespace
	chain, der, err := signPeerCert(e.mesh.CADir, id, dns)
	if err != nil {
		return "", "", "", id, "", fmt.Errorf("peerbench: certificate of %s: %w", pod.Name, err)
	}
	var chainPEM []byte
	for _, c := range chain {
		chainPEM = append(chainPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c})...)
	}
	cert = filepath.Join(e.dir, pod.Name+".crt")
	key = filepath.Join(e.dir, pod.Name+".key")
	bundle = filepath.Join(e.dir, "bundle.crt")
	root := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.mesh.CA.Root().Raw})
	for path, b := range map[string][]byte{cert: chainPEM, key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), bundle: root} {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			return "", "", "", id, "", fmt.Errorf("peerbench: %w", err)
		}
	}
	return cert, key, bundle, id, dns, nil
}

// signPeerCert makes an ECDSA P-256 key and a certificate for it, signed
// by the CA in caDir (its intermediate if it has one), with id and dns as
// names, good for an hour. It returns the chain (leaf first, DER) and the
// key (PKCS#8 DER).
func signPeerCert(caDir string, id spiffeid.ID, dns string) (chain [][]byte, key []byte, err error) {
	certFile, keyFile := ca.RootCertFile, ca.RootKeyFile
	if _, err := os.Stat(filepath.Join(caDir, ca.IntermediateKeyFile)); err == nil {
		certFile, keyFile = ca.IntermediateFile, ca.IntermediateKeyFile
	}
	issuerPEM, err := os.ReadFile(filepath.Join(caDir, certFile))
	if err != nil {
		return nil, nil, err
	}
	issuerKeyPEM, err := os.ReadFile(filepath.Join(caDir, keyFile))
	if err != nil {
		return nil, nil, err
	}
	ib, _ := pem.Decode(issuerPEM)
	kb, _ := pem.Decode(issuerKeyPEM)
	if ib == nil || kb == nil {
		return nil, nil, fmt.Errorf("no PEM in %s or %s", certFile, keyFile)
	}
	issuer, err := x509.ParseCertificate(ib.Bytes)
	if err != nil {
		return nil, nil, err
	}
	signer, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"mantlet bench"}},
		NotBefore:             now.Add(-ca.Backdate),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              []string{dns},
	}
	leaf, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, &priv.PublicKey, signer)
	if err != nil {
		return nil, nil, err
	}
	key, err = x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	chain = [][]byte{leaf}
	if certFile == ca.IntermediateFile {
		chain = append(chain, issuer.Raw)
	}
	return chain, key, nil
}

// ghostunnelBinary returns the ghostunnel to run: given, or built from the
// repository's tools module (built now if it is not), or why there is
// none.
func ghostunnelBinary(ctx context.Context, given string, log *slog.Logger) (path, version string, err error) {
	if given != "" {
		out, err := exec.CommandContext(ctx, given, "--version").CombinedOutput()
		if err != nil {
			return "", "", fmt.Errorf("%s --version: %w: %s", given, err, strings.TrimSpace(string(out)))
		}
		return given, strings.TrimSpace(string(out)), nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", "", err
	}
	g, err := peerbin.Find(wd)
	if errors.Is(err, peerbin.ErrMissing) {
		root, rerr := repoRoot(wd)
		if rerr != nil {
			return "", "", rerr
		}
		g, _, err = peerbin.Build(ctx, root, log)
	}
	if err != nil {
		return "", "", fmt.Errorf("%w (or give one with --ghostunnel)", err)
	}
	return g.Path, g.Info.Ghostunnel, nil
}

// startGhostunnel starts a ghostunnel server in each server pod and, in
// the client pod, one ghostunnel client per server pod (a sidecar proxies
// one upstream), and returns the client's local addresses; plus a pair
// more for the iperf3 server of the first server pod, and the client's
// address for it.
func (e *peerEnv) startGhostunnel(ctx context.Context, bin string) (targets []netip.AddrPort, iperf netip.AddrPort, client, server []*proc, err error) {
	defer func() {
		if err != nil {
			err = errors.Join(err, stopAll(append(client, server...)))
		}
	}()
	ccert, ckey, bundle, cid, _, err := e.credentials(e.client)
	if err != nil {
		return nil, iperf, nil, nil, err
	}
	pair := func(i int, srv *testbed.Pod, serverPort, appPort int, what string) (netip.AddrPort, error) {
		scert, skey, _, sid, sdns, err := e.credentials(srv)
		if err != nil {
			return netip.AddrPort{}, err
		}
		listen := hostPort(srv.IP.String(), serverPort)
		p, err := startProc(srv, "ghostunnel server"+what+" in "+srv.Name, bin, "server",
			"--listen", listen, "--target", hostPort("127.0.0.1", appPort),
			"--cert", scert, "--key", skey, "--cacert", bundle,
			"--allow-uri", cid.String(), "--shutdown-timeout", "2s")
		if err != nil {
			return netip.AddrPort{}, err
		}
		p.throughputOnly = appPort == IperfPort
		server = append(server, p)
		if err := p.waitListening(ctx, srv, listen); err != nil {
			return netip.AddrPort{}, err
		}
		local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(ghostunnelClientPort+i))
		p, err = startProc(e.client, fmt.Sprintf("ghostunnel client %d%s in %s", i+1, what, e.client.Name), bin, "client",
			"--listen", local.String(), "--target", listen,
			"--cert", ccert, "--key", ckey, "--cacert", bundle,
			"--override-server-name", sdns, "--verify-uri", sid.String(), "--shutdown-timeout", "2s")
		if err != nil {
			return netip.AddrPort{}, err
		}
		p.throughputOnly = appPort == IperfPort
		client = append(client, p)
		return local, p.waitListening(ctx, e.client, local.String())
	}
	for i, srv := range e.servers {
		local, err := pair(i, srv, ghostunnelServerPort, AppPort, "")
		if err != nil {
			return nil, iperf, client, server, err
		}
		targets = append(targets, local)
	}
	iperf, err = pair(len(e.servers), e.servers[0], ghostunnelIperfPort, IperfPort, " (iperf3)")
	if err != nil {
		return nil, iperf, client, server, err
	}
	return targets, iperf, client, server, nil
}

// nginxInstalled returns nginx's version, or why it cannot run.
func nginxInstalled(ctx context.Context) (string, error) {
	for _, f := range []string{nginxBinary, nginxStreamModule} {
		if _, err := os.Stat(f); err != nil {
			return "", fmt.Errorf("peerbench: nginx: %w (Debian: apt-get install nginx libnginx-mod-stream)", err)
		}
	}
	out, err := exec.CommandContext(ctx, nginxBinary, "-v").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("peerbench: %s -v: %w: %s", nginxBinary, err, strings.TrimSpace(string(out)))
	}
	v := strings.TrimSpace(string(out))
	if m := regexp.MustCompile(`nginx/(\S+)`).FindStringSubmatch(v); m != nil {
		v = m[1]
	}
	return v, nil
}

// installPackages installs Debian packages with apt-get (root only),
// updating the package lists if the first try fails.
func installPackages(ctx context.Context, log *slog.Logger, pkgs ...string) error {
	what := strings.Join(pkgs, " ")
	if os.Geteuid() != 0 {
		return fmt.Errorf("peerbench: installing %s needs root", what)
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return fmt.Errorf("peerbench: install %s: %w", what, err)
	}
	ctx, cancel := context.WithTimeout(ctx, installTimeout)
	defer cancel()
	apt := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			return fmt.Errorf("apt-get %s: %w: %s", strings.Join(args, " "), err, strings.Join(lines[max(0, len(lines)-3):], " / "))
		}
		return nil
	}
	install := append([]string{"install", "-y", "-q", "--no-install-recommends"}, pkgs...)
	log.Info("installing with apt-get", "packages", what)
	err := apt(install...)
	if err != nil {
		if uerr := apt("update", "-q"); uerr != nil {
			return fmt.Errorf("peerbench: install %s: %w", what, errors.Join(err, uerr))
		}
		err = apt(install...)
	}
	if err != nil {
		return fmt.Errorf("peerbench: install %s: %w", what, err)
	}
	return nil
}

// nginxConfig is the configuration of one nginx: the stream servers
// given, with what both sides share.
func nginxConfig(dir string, servers string) string {
	// 2 workers (one per CPU here), each with room for both sockets of
	// 5,000 proxied connections; reuseport spreads new connections
	// evenly over them. The master runs as root and reads the keys; the
	// workers run as nobody.
	return fmt.Sprintf(`load_module %s;
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid %s;
error_log stderr warn;
events {
	worker_connections 19000;
}
stream {
%s}
`, nginxStreamModule, filepath.Join(dir, "nginx.pid"), servers)
}

// startNginx starts an nginx in each server pod (TLS 1.3 with a required
// client certificate, to the app on 127.0.0.1; the first also to its
// iperf3 server) and one in the client pod with a listener per server
// (and one for the iperf3 server), and returns the client's local
// addresses.
//
// Both sides verify the other's chain against the mesh's bundle, and the
// client the server's DNS name; nginx cannot check a SPIFFE ID (a URI
// SAN), so neither checks the other's identity beyond that.
func (e *peerEnv) startNginx(ctx context.Context) (targets []netip.AddrPort, iperf netip.AddrPort, client, server []*proc, err error) {
	defer func() {
		if err != nil {
			err = errors.Join(err, stopAll(append(client, server...)))
		}
	}()
	ccert, ckey, bundle, _, _, err := e.credentials(e.client)
	if err != nil {
		return nil, iperf, nil, nil, err
	}
	var clientServers strings.Builder
	local := nginxClientPort
	for i, srv := range e.servers {
		scert, skey, _, _, sdns, err := e.credentials(srv)
		if err != nil {
			return nil, iperf, client, server, err
		}
		dir := filepath.Join(e.dir, "nginx-"+srv.Name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, iperf, client, server, fmt.Errorf("peerbench: %w", err)
		}
		apps := []int{AppPort}
		if i == 0 {
			apps = append(apps, IperfPort)
		}
		var serverServers strings.Builder
		var listens []string
		for k, app := range apps {
			listen := hostPort(srv.IP.String(), nginxServerPort+10*k)
			listens = append(listens, listen)
			fmt.Fprintf(&serverServers, `	server {
		listen %s ssl reuseport;
		ssl_protocols TLSv1.3;
		ssl_certificate %s;
		ssl_certificate_key %s;
		ssl_verify_client on;
		ssl_client_certificate %s;
		proxy_pass %s;
	}
`, listen, scert, skey, bundle, hostPort("127.0.0.1", app))
			addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(local))
			local++
			fmt.Fprintf(&clientServers, `	server {
		listen %s reuseport;
		proxy_pass %s;
		proxy_ssl on;
		proxy_ssl_protocols TLSv1.3;
		proxy_ssl_certificate %s;
		proxy_ssl_certificate_key %s;
		proxy_ssl_verify on;
		proxy_ssl_trusted_certificate %s;
		proxy_ssl_name %s;
	}
`, addr, listen, ccert, ckey, bundle, sdns)
			if app == IperfPort {
				iperf = addr
			} else {
				targets = append(targets, addr)
			}
		}
		p, err := e.runNginx(srv, dir, nginxConfig(dir, serverServers.String()))
		if err != nil {
			return nil, iperf, client, server, err
		}
		server = append(server, p)
		for _, l := range listens {
			if err := p.waitListening(ctx, srv, l); err != nil {
				return nil, iperf, client, server, err
			}
		}
	}
	dir := filepath.Join(e.dir, "nginx-"+e.client.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, iperf, client, server, fmt.Errorf("peerbench: %w", err)
	}
	p, err := e.runNginx(e.client, dir, nginxConfig(dir, clientServers.String()))
	if err != nil {
		return nil, iperf, client, server, err
	}
	client = append(client, p)
	for _, t := range append(slices.Clone(targets), iperf) {
		if err := p.waitListening(ctx, e.client, t.String()); err != nil {
			return nil, iperf, client, server, err
		}
	}
	return targets, iperf, client, server, nil
}

// runNginx writes conf into dir and starts nginx with it in pod.
func (e *peerEnv) runNginx(pod *testbed.Pod, dir, conf string) (*proc, error) {
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, fmt.Errorf("peerbench: %w", err)
	}
	return startProc(pod, "nginx in "+pod.Name, nginxBinary, "-p", dir, "-c", path, "-e", "stderr")
}
