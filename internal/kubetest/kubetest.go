// Package kubetest runs a real Kubernetes API server for tests: etcd and
// kube-apiserver, built from the nested module test/kube/tools by
// `make kube-binaries` (see docs/kubetest.md), with a throwaway CA,
// authentication by client certificate and by service-account token, and
// RBAC authorization, so that what a test is refused is what a cluster
// would refuse.
//
// Nothing else of a cluster runs: no kubelet, no scheduler, no controller
// manager. Tests create what those would (ServiceAccounts, pods with
// spec.nodeName set, pod IPs written through the status subresource).
//
// Start runs it in the test's own network namespace, on 127.0.0.1 (no root
// needed), or, with Options.ControlPlane, in a testbed's control-plane
// namespace, where the nodes reach it over the underlay as on a real
// cluster and nothing outside the testbed does. etcd listens on a unix
// socket in the run's folder either way. The processes die with the test
// binary, and Stop (which Start registers with t.Cleanup) kills them and
// removes every file of the run.
package kubetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clientcmdv1 "k8s.io/client-go/tools/clientcmd/api/v1"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/proc"
	"github.com/mantlet/mantlet/internal/testbed"
)

// Defaults and fixed settings of the API server.
const (
	// DefaultPort is the API server's port in a control-plane namespace.
	// On loopback it takes a free port instead.
	DefaultPort = 6443
	// DefaultReadyTimeout bounds the wait for /readyz.
	DefaultReadyTimeout = 3 * time.Minute
	// Issuer is the service-account token issuer, and the audience the
	// API server accepts.
	Issuer = "https://kubernetes.default.svc.cluster.local"
	// AdminUser is the admin certificate's user; it is in the group
	// system:masters.
	AdminUser = "kubetest-admin"
	// TokenTTL is the lifetime of the tokens ServiceAccountToken mints.
	TokenTTL = time.Hour
)

// DisabledAdmissionPlugins are the default admission plugins that are off:
// ServiceAccount needs the controller manager (it refuses every pod whose
// service account does not exist, and the "default" one of each namespace
// is made by the controller manager; it adds a token volume only a kubelet
// would mount). Every other default plugin stays on.
var DisabledAdmissionPlugins = []string{"ServiceAccount"}

// Options configure Start and Launch. The zero value runs on loopback with
// the binaries kubebin.Find finds.
type Options struct {
	// ControlPlane, if set, runs etcd and kube-apiserver in the testbed's
	// control-plane namespace, the API server listening on the control
	// plane's address: nodes and pods reach it over the underlay. The
	// Server's clients then dial from inside that namespace (the root
	// namespace has no route to the testbed). Needs root. When nil, they
	// run in this process's network namespace on 127.0.0.1.
	ControlPlane *testbed.ControlPlane
	// Port is the API server's port: DefaultPort in a control plane, a
	// free port on loopback when zero.
	Port uint16
	// Binaries to run; kubebin.Find when nil.
	Binaries *kubebin.Binaries
	// Log receives what the harness does (default: discard; Start logs to
	// the test).
	Log *slog.Logger
	// ReadyTimeout bounds the wait for the API server's /readyz
	// (default DefaultReadyTimeout).
	ReadyTimeout time.Duration
	// Cluster runs the API server for a whole cluster, with a controller
	// manager, a scheduler and kubelets beside it (internal/kubecluster):
	// ServiceAccount admission stays on and the API server keeps the
	// kubernetes Service's endpoints (its advertised address), as in any
	// cluster. Such a cluster needs a control plane.
	Cluster bool
}

// Server is a running etcd and kube-apiserver.
type Server struct {
	// URL is the API server's address, https://<address>:<port>.
	URL string
	// Addr is the address and port the API server listens on.
	Addr netip.AddrPort
	// CA is the PEM bundle that verifies the API server's certificate
	// (and signs the admin's).
	CA []byte

	admin     *rest.Config
	adminCert []byte // PEM, with adminKey: for Kubeconfig files
	adminKey  []byte
	client    *kubernetes.Clientset
	dial      func(ctx context.Context, network, address string) (net.Conn, error)
	dir       string
	log       *slog.Logger

	launcher        *proc.Launcher
	etcd, apiserver *proc.Process

	stopOnce sync.Once
	stopErr  error
}

// Start launches a server for t and stops it when t ends (t.Cleanup). If
// the binaries are not built it skips t, saying how to build them, or
// under CI=true fails it; with Options.ControlPlane it needs root (see
// privtest.Require). Anything else that goes wrong fails t.
func Start(ctx context.Context, t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.ControlPlane != nil {
		privtest.Require(t)
	}
	if opts.Binaries == nil {
		b := RequireBinaries(t)
		opts.Binaries = &b
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	s, err := Launch(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubetest: the end of the API server's log:\n%s", s.apiserver.LogTail(30))
		}
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s
}

// RequireBinaries returns the binaries kubebin.Find finds. If they are not
// built it skips t with a message that says how to build them, or, under
// CI=true (where .ci/run builds them before the tests), fails t. A test that
// builds a testbed first calls it before, so as not to build one for
// nothing.
func RequireBinaries(t testing.TB) kubebin.Binaries {
	t.Helper()
	b, err := kubebin.Find()
	switch {
	case errors.Is(err, kubebin.ErrMissing) && privtest.InCI():
		t.Fatalf("%s needs a Kubernetes API server, and CI builds one before the tests (.ci/run): %v", t.Name(), err)
	case errors.Is(err, kubebin.ErrMissing):
		t.Skipf("%s needs a Kubernetes API server: %v", t.Name(), err)
	case err != nil:
		t.Fatalf("%s needs a Kubernetes API server: %v", t.Name(), err)
	}
	return b
}

// Launch starts etcd and kube-apiserver and waits until the API server is
// ready; ctx bounds that wait, not the server, which runs until Stop. The
// caller must Stop the server. If anything fails, everything
// started is removed and the error says what failed, with the end of the
// failing process's log.
func Launch(ctx context.Context, opts Options) (*Server, error) {
	start := time.Now()
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = DefaultReadyTimeout
	}
	if opts.Binaries == nil {
		b, err := kubebin.Find()
		if err != nil {
			return nil, err
		}
		opts.Binaries = &b
	}
	sweepStale(opts.Log)
	// A short folder: unix socket paths must fit in 108 bytes.
	dir, err := os.MkdirTemp("", runDirPattern)
	if err != nil {
		return nil, fmt.Errorf("kubetest: run folder: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, errors.Join(fmt.Errorf("kubetest: run folder: %w", err), os.RemoveAll(dir))
	}
	s := &Server{dir: dir, log: opts.Log.With("kubetest", filepath.Base(dir)), launcher: proc.NewLauncher()}
	if err := s.launch(ctx, opts); err != nil {
		return nil, errors.Join(err, s.Stop())
	}
	s.log.Info("kube-apiserver ready", "url", s.URL, "took", time.Since(start).Round(time.Millisecond))
	return s, nil
}

func (s *Server) launch(ctx context.Context, opts Options) error {
	addr, netns := netip.AddrFrom4([4]byte{127, 0, 0, 1}), ""
	port := opts.Port
	if cp := opts.ControlPlane; cp != nil {
		addr, netns, s.dial = cp.IP, cp.NS, cp.Dial
		if port == 0 {
			port = DefaultPort
		}
	}
	// The kubernetes Service's virtual IP (the first of the range) too:
	// pods, such as mantlet's agents, reach the API server through it.
	p, err := newPKI(s.dir, []netip.Addr{addr, testbed.ServiceCIDR.Addr().Next()})
	if err != nil {
		return err
	}
	s.CA, s.adminCert, s.adminKey = p.caPEM, p.adminCert, p.adminKey
	if opts.Cluster && opts.ControlPlane == nil {
		return errors.New("kubetest: a cluster's API server needs a control plane")
	}
	sock := filepath.Join(s.dir, "etcd.sock")
	if len(sock) > 100 {
		return fmt.Errorf("kubetest: etcd's socket path %s is too long for a unix socket: set TMPDIR to a shorter folder", sock)
	}
	if err := s.startEtcd(ctx, opts.Binaries.Etcd, netns, sock); err != nil {
		return err
	}
	// On loopback the port is picked free and might be taken before the
	// API server binds it: then pick another, a few times.
	for attempt := 1; ; attempt++ {
		ap := port
		if ap == 0 {
			if ap, err = freePort(addr); err != nil {
				return err
			}
		}
		s.Addr = netip.AddrPortFrom(addr, ap)
		s.URL = "https://" + s.Addr.String()
		s.admin = &rest.Config{
			Host: s.URL,
			TLSClientConfig: rest.TLSClientConfig{
				CAData:   s.CA,
				CertData: p.adminCert,
				KeyData:  p.adminKey,
			},
			Dial: s.dial,
			// The defaults (QPS 5) throttle tests for no reason.
			QPS: 200, Burst: 400,
		}
		err = s.startAPIServer(ctx, opts, netns, sock, attempt)
		if err == nil || port != 0 || attempt == 3 || s.apiserver == nil || s.apiserver.Running() ||
			!strings.Contains(s.apiserver.LogTail(20), "address already in use") {
			break
		}
		s.log.Info("the API server's port was taken; trying another", "port", ap)
		s.apiserver = nil
	}
	if err != nil {
		return err
	}
	if s.client, err = kubernetes.NewForConfig(s.AdminConfig()); err != nil {
		return fmt.Errorf("kubetest: admin client: %w", err)
	}
	return nil
}

// startEtcd runs etcd with its client and peer URLs on unix sockets in the
// run's folder (the peer socket is named by a host:port, relative to the
// folder, as etcd wants it), so it opens no port at all, and waits until
// it accepts connections.
func (s *Server) startEtcd(ctx context.Context, bin, netns, sock string) error {
	const peer = "unix://localhost:2380"
	var err error
	s.etcd, err = s.launcher.Start(proc.Command{Name: "etcd", Netns: netns, Dir: s.dir, LogPath: filepath.Join(s.dir, "etcd.log"), Argv: []string{bin,
		"--name=kubetest",
		"--data-dir=" + filepath.Join(s.dir, "etcd"),
		"--listen-client-urls=unix://" + sock,
		"--advertise-client-urls=unix://" + sock,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=kubetest=" + peer,
		// The data are thrown away after the test.
		"--unsafe-no-fsync",
		"--log-level=warn",
	}})
	if err != nil {
		return fmt.Errorf("kubetest: %w", err)
	}
	return s.poll(ctx, s.etcd, time.Minute, "etcd to listen on "+sock, func() (bool, string) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			return false, err.Error()
		}
		c.Close()
		return true, ""
	})
}

// startAPIServer runs kube-apiserver and waits for /readyz.
func (s *Server) startAPIServer(ctx context.Context, opts Options, netns, sock string, attempt int) error {
	f := func(name string) string { return filepath.Join(s.dir, name) }
	// Without a controller manager: no ServiceAccount admission (it needs
	// the accounts the controller manager makes) and no endpoints of the
	// kubernetes Service (on loopback there is no address it would
	// accept).
	disabled, reconciler := DisabledAdmissionPlugins, "none"
	if opts.Cluster {
		disabled, reconciler = nil, "lease"
	}
	var err error
	s.apiserver, err = s.launcher.Start(proc.Command{Name: "kube-apiserver", Netns: netns, Dir: s.dir,
		LogPath: f(fmt.Sprintf("kube-apiserver-%d.log", attempt)), Argv: []string{opts.Binaries.APIServer,
			"--etcd-servers=unix://" + sock,
			"--bind-address=" + s.Addr.Addr().String(),
			"--advertise-address=" + s.Addr.Addr().String(),
			"--secure-port=" + strconv.Itoa(int(s.Addr.Port())),
			"--tls-cert-file=" + f(servingCertFile),
			"--tls-private-key-file=" + f(servingKeyFile),
			"--cert-dir=" + f("certs"),
			"--client-ca-file=" + f(caFile),
			"--authorization-mode=RBAC",
			"--service-account-issuer=" + Issuer,
			"--service-account-key-file=" + f(saPubFile),
			"--service-account-signing-key-file=" + f(saKeyFile),
			"--service-cluster-ip-range=" + testbed.ServiceCIDR.String(),
			"--disable-admission-plugins=" + strings.Join(disabled, ","),
			"--endpoint-reconciler-type=" + reconciler,
			// Nodes' names resolve nowhere: reach kubelets (kubectl logs,
			// exec) by their addresses.
			"--kubelet-preferred-address-types=InternalIP",
			// The chart's DaemonSet is privileged.
			"--allow-privileged=true",
			"--profiling=false",
		}})
	if err != nil {
		return fmt.Errorf("kubetest: %w", err)
	}
	hc, err := rest.HTTPClientFor(s.admin)
	if err != nil {
		return fmt.Errorf("kubetest: readiness client: %w", err)
	}
	return s.poll(ctx, s.apiserver, opts.ReadyTimeout, "kube-apiserver's /readyz at "+s.URL, func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(rctx, http.MethodGet, s.URL+"/readyz?verbose", nil)
		if err != nil {
			return false, err.Error()
		}
		resp, err := hc.Do(req)
		if err != nil {
			return false, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if resp.StatusCode == http.StatusOK {
			return true, ""
		}
		return false, fmt.Sprintf("%s: %s", resp.Status, failingChecks(string(body)))
	})
}

// Run folders are $TMPDIR/kubetest-*, with the PID of the process that
// made them in the file "owner".
const (
	runDirPattern = "kubetest-*"
	ownerFile     = "owner"
)

// sweepStale removes the run folders of processes that are gone: a test
// binary that was killed (a go test timeout) takes its etcd and
// kube-apiserver with it, by their parent-death signal, but cannot remove
// its folder.
func sweepStale(log *slog.Logger) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), runDirPattern))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, ownerFile))
		if err != nil {
			continue // being made, or not ours
		}
		pid, err := strconv.Atoi(string(b))
		if err != nil || proc.Exists(pid) {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			log.Warn("could not remove the run folder of a process that is gone", "dir", d, "pid", pid, "err", err)
			continue
		}
		log.Info("removed the run folder of a process that is gone", "dir", d, "pid", pid)
	}
}

// failingChecks keeps the lines of a verbose /readyz answer that say what
// is not ready yet.
func failingChecks(body string) string {
	var bad []string
	for line := range strings.Lines(body) {
		if strings.HasPrefix(line, "[-]") {
			bad = append(bad, strings.TrimSpace(line))
		}
	}
	if len(bad) == 0 {
		return strings.TrimSpace(body)
	}
	return strings.Join(bad, "; ")
}

// pollInterval is how often poll looks.
const pollInterval = 100 * time.Millisecond

// poll calls ready until it reports true, the process exits (an error with
// the end of its log), timeout passes or ctx is done (an error with the
// last thing ready said).
func (s *Server) poll(ctx context.Context, p *proc.Process, timeout time.Duration, what string, ready func() (bool, string)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	last := "nothing yet"
	for {
		ok, why := ready()
		if ok {
			return nil
		}
		last = why
		select {
		case <-p.Exited():
			return fmt.Errorf("kubetest: waiting for %s: %w", what, p.ExitError())
		case <-ctx.Done():
			return fmt.Errorf("kubetest: waiting for %s: %w (last: %s); the end of its log %s:\n%s", what, ctx.Err(), last, p.LogPath, p.LogTail(30))
		case <-tick.C:
		}
	}
}

// freePort returns a TCP port of addr that nothing listens on now.
func freePort(addr netip.Addr) (uint16, error) {
	l, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		return 0, fmt.Errorf("kubetest: find a free port: %w", err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port), nil
}

// AdminConfig returns a new copy of the admin's client configuration
// (client certificate, group system:masters).
func (s *Server) AdminConfig() *rest.Config { return rest.CopyConfig(s.admin) }

// Admin returns a clientset with the admin's configuration.
func (s *Server) Admin() *kubernetes.Clientset { return s.client }

// TokenConfig returns a client configuration that authenticates with a
// bearer token (for example from ServiceAccountToken) and nothing else.
func (s *Server) TokenConfig(token string) *rest.Config {
	return &rest.Config{
		Host:            s.URL,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.CA},
		BearerToken:     token,
		Dial:            s.dial,
		QPS:             200, Burst: 400,
	}
}

// ServiceAccountToken makes sure that the namespace and the service account
// exist, then mints a token for the account through the TokenRequest API,
// valid for TokenTTL, for the audience Issuer: what a kubelet gives a pod.
func (s *Server) ServiceAccountToken(ctx context.Context, namespace, name string) (string, error) {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}
	if _, err := s.client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("kubetest: create namespace %s: %w", namespace, err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}}
	if _, err := s.client.CoreV1().ServiceAccounts(namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("kubetest: create service account %s/%s: %w", namespace, name, err)
	}
	ttl := int64(TokenTTL / time.Second)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &ttl}}
	tr, err := s.client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, tr, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("kubetest: token for service account %s/%s: %w", namespace, name, err)
	}
	return tr.Status.Token, nil
}

// Kubeconfig returns a kubeconfig file that reaches the API server at URL,
// trusts CA and authenticates with token: what an agent on a testbed node
// is given. (It names the server by its address, so it works wherever
// that address is reachable: from the testbed's nodes and pods when the
// server runs on a control plane.)
func (s *Server) Kubeconfig(token string) ([]byte, error) {
	const name = "kubetest"
	cfg := clientcmdv1.Config{
		Kind:           "Config",
		APIVersion:     "v1",
		Clusters:       []clientcmdv1.NamedCluster{{Name: name, Cluster: clientcmdv1.Cluster{Server: s.URL, CertificateAuthorityData: s.CA}}},
		AuthInfos:      []clientcmdv1.NamedAuthInfo{{Name: name, AuthInfo: clientcmdv1.AuthInfo{Token: token}}},
		Contexts:       []clientcmdv1.NamedContext{{Name: name, Context: clientcmdv1.Context{Cluster: name, AuthInfo: name}}},
		CurrentContext: name,
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubetest: encode kubeconfig: %w", err)
	}
	return b, nil
}

// AdminKubeconfig returns a kubeconfig file with the admin's client
// certificate (group system:masters), naming the server by its address:
// what a cluster's controller manager, scheduler, kubelets and kube-proxy
// are given in internal/kubecluster, and what kubectl and helm use.
func (s *Server) AdminKubeconfig() ([]byte, error) {
	const name = "kubetest"
	cfg := clientcmdv1.Config{
		Kind:           "Config",
		APIVersion:     "v1",
		Clusters:       []clientcmdv1.NamedCluster{{Name: name, Cluster: clientcmdv1.Cluster{Server: s.URL, CertificateAuthorityData: s.CA}}},
		AuthInfos:      []clientcmdv1.NamedAuthInfo{{Name: AdminUser, AuthInfo: clientcmdv1.AuthInfo{ClientCertificateData: s.adminCert, ClientKeyData: s.adminKey}}},
		Contexts:       []clientcmdv1.NamedContext{{Name: name, Context: clientcmdv1.Context{Cluster: name, AuthInfo: AdminUser}}},
		CurrentContext: name,
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubetest: encode kubeconfig: %w", err)
	}
	return b, nil
}

// CAFile is the path of the CA bundle in the run's folder (a controller
// manager's --root-ca-file).
func (s *Server) CAFile() string { return filepath.Join(s.dir, caFile) }

// ServiceAccountKeyFile is the path of the key that signs service-account
// tokens (a controller manager's --service-account-private-key-file).
func (s *Server) ServiceAccountKeyFile() string { return filepath.Join(s.dir, saKeyFile) }

// Dir returns the run's folder: credentials, etcd's data and socket, and
// the logs (etcd.log, kube-apiserver-<attempt>.log). Stop removes it.
func (s *Server) Dir() string { return s.dir }

// Stop kills kube-apiserver and etcd (SIGKILL to their process groups:
// their state is thrown away), waits until they are gone and removes the
// run's folder. It is idempotent.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		var errs []error
		for _, p := range []*proc.Process{s.apiserver, s.etcd} {
			if p != nil {
				if err := p.Kill(); err != nil {
					errs = append(errs, fmt.Errorf("kubetest: %w", err))
				}
			}
		}
		s.launcher.Close()
		if err := os.RemoveAll(s.dir); err != nil {
			errs = append(errs, fmt.Errorf("kubetest: remove %s: %w", s.dir, err))
		}
		s.stopErr = errors.Join(errs...)
		if s.stopErr == nil {
			s.log.Info("kube-apiserver and etcd stopped, files removed")
		}
	})
	return s.stopErr
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}
