package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/internal/meshtest"
	"github.com/mantlet/mantlet/internal/testbed"
	"github.com/mantlet/mantlet/ztunnel/hbone"
)

const trustDomainAnnotation = "mantlet.io/trust-domain"

// Policies on node2's server naming the client of a.test, and its
// lookalike of b.test (same namespace and service account).
const (
	allowClientOfA = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: allow-a-client}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://a.test/ns/shop/sa/client"]}]
`
	allowClientOfB = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: allow-b-client}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://b.test/ns/shop/sa/client"]}]
`
	denyClientOfA = `
apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata: {namespace: shop, name: deny-a-client}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{principals: ["spiffe://a.test/ns/shop/sa/client"]}]
`
)

// TestFederatedTrustDomains runs node1's agent in trust domain a.test and
// node2's in b.test, with two CAs that signed nothing of each other, each
// agent given the other's bundle (--federate). The client on node1
// reaches the echo server on node2 over mTLS, each side seeing the
// other's domain's identity; policies on node2 naming the a.test
// principal allow and deny it, one naming its b.test lookalike does not
// admit it; a certificate of b.test signed by a.test's CA is refused
// although node2 trusts that CA for a.test; a bundle file rewritten under
// a running agent is read again and counted; without the federated
// bundle, node2 refuses the client with tls_untrusted_domain, counted and
// logged.
func TestFederatedTrustDomains(t *testing.T) {
	dir := t.TempDir()
	dirA, dirB := filepath.Join(dir, "ca-a"), filepath.Join(dir, "ca-b")
	caA, err := ca.Init(dirA, spiffeid.RequireTrustDomainFromString("a.test"), ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	caB, err := ca.Init(dirB, spiffeid.RequireTrustDomainFromString("b.test"), ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// node2's --federate file for a.test: a.test's root.pem, none, or a
	// copy that the test edits.
	var bundleOfA atomic.Value
	bundleOfA.Store(filepath.Join(dirA, ca.RootCertFile))
	spec := testbed.Spec{
		Nodes: []testbed.NodeSpec{
			{Name: "node1", Annotations: map[string]string{trustDomainAnnotation: "a.test"},
				Pods: []testbed.PodSpec{{Name: "client", Namespace: "shop", ServiceAccount: "client"}}},
			{Name: "node2", Annotations: map[string]string{trustDomainAnnotation: "b.test"},
				Pods: []testbed.PodSpec{{Name: "server", Namespace: "shop", ServiceAccount: "server", Labels: map[string]string{"app": "server"}}}},
		},
		Namespaces: map[string]map[string]string{"shop": meshedNS},
	}
	m := startMesh(t, spec, meshtest.Options{
		// node2 decides every connection itself.
		AgentArgs: []string{"--no-policy-precheck"},
		IssuerArgs: func(node string) []string {
			if node == "node1" {
				return []string{"--ca-dir", dirA, "--federate", "b.test=" + filepath.Join(dirB, ca.RootCertFile)}
			}
			args := []string{"--ca-dir", dirB, "--federate-poll", "200ms"}
			if f := bundleOfA.Load().(string); f != "" {
				args = append(args, "--federate", "a.test="+f)
			}
			return args
		},
	})
	const clientID, serverID = "spiffe://a.test/ns/shop/sa/client", "spiffe://b.test/ns/shop/sa/server"
	echo(t, m, "server", appPort)
	dst := netip.AddrPortFrom(m.Pod("server").IP, appPort)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("the client of a.test reaches the server of b.test over mTLS", func(t *testing.T) {
		c := dial(t, m, "client", dst)
		ping(t, c, "across trust domains")
		src := netip.MustParseAddrPort(c.LocalAddr().String())
		c.Close()
		in, err := m.WaitFlow(ctx, "node2", func(f meshtest.Flow) bool { return f.Src == src })
		if err != nil {
			t.Fatal(err)
		}
		if in.Direction != "inbound" || in.Path != "hbone" || in.SrcID != clientID || in.DstID != serverID || in.Flag != "-" {
			t.Errorf("node2's flow: %+v; want inbound over HBONE from %s to %s", in, clientID, serverID)
		}
		out, err := m.WaitFlow(ctx, "node1", func(f meshtest.Flow) bool { return f.Src == src })
		if err != nil {
			t.Fatal(err)
		}
		if out.Path != "hbone" || out.SrcID != clientID || out.DstID != serverID {
			t.Errorf("node1's flow: %+v; want HBONE from %s to %s", out, clientID, serverID)
		}
	})

	t.Run("each node shows the other's bundle as federated", func(t *testing.T) {
		for node, want := range map[string]struct {
			td   string
			file string
			root *x509.Certificate
		}{"node1": {"b.test", filepath.Join(dirB, ca.RootCertFile), caB.Root()}, "node2": {"a.test", filepath.Join(dirA, ca.RootCertFile), caA.Root()}} {
			st, err := m.Status(ctx, node)
			if err != nil {
				t.Fatal(err)
			}
			i := slices.IndexFunc(st.Bundles, func(b admin.TrustBundle) bool { return b.TrustDomain == want.td })
			if i < 0 || !st.Bundles[i].Federated || st.Bundles[i].Source != want.file || len(st.Bundles[i].Roots) != 1 {
				t.Fatalf("%s's trust bundles: %+v; want %s federated from %s with one root", node, st.Bundles, want.td, want.file)
			}
			mfs, err := m.Metrics(ctx, node)
			if err != nil {
				t.Fatal(err)
			}
			if v, ok := mfs.Value("mantlet_trust_bundle_authorities", map[string]string{"trust_domain": want.td, "federated": "true"}); !ok || v != 1 {
				t.Errorf("%s: mantlet_trust_bundle_authorities{trust_domain=%q,federated=\"true\"} = %v (%v), want 1", node, want.td, v, ok)
			}
		}
		out := mantlet(t, m, "node2", "certs", "--bundles")
		if !strings.Contains(out, "a.test") || !strings.Contains(out, filepath.Join(dirA, ca.RootCertFile)) {
			t.Errorf("mantlet certs --bundles on node2 does not list a.test's federated bundle:\n%s", out)
		}
	})

	t.Run("policies on node2 match the a.test principal exactly", func(t *testing.T) {
		writePolicies(t, m, allowClientOfA)
		if !reaches(m, "client", dst) {
			t.Fatal("an ALLOW of spiffe://a.test/ns/shop/sa/client does not admit the client")
		}
		writePolicies(t, m, allowClientOfB)
		if reaches(m, "client", dst) {
			t.Fatal("an ALLOW of spiffe://b.test/ns/shop/sa/client admits the client of a.test")
		}
		waitDenied(t, m, "node2", func(ev events.Flow) bool {
			return ev.Dst.Addr == dst && ev.Src.Identity == clientID && ev.Reason == "no-allow-matched"
		})
		writePolicies(t, m, allowClientOfA+"---\n"+denyClientOfA)
		if reaches(m, "client", dst) {
			t.Fatal("a DENY of spiffe://a.test/ns/shop/sa/client lets the client through")
		}
		waitDenied(t, m, "node2", func(ev events.Flow) bool {
			return ev.Dst.Addr == dst && ev.Src.Identity == clientID && ev.Policy == "shop/deny-a-client"
		})
		writePolicies(t, m, "")
		if !reaches(m, "client", dst) {
			t.Fatal("the client does not reach the server once the policies are gone")
		}
	})

	t.Run("a certificate of b.test signed by a.test's CA is refused", func(t *testing.T) {
		forged := mintWithRootKey(t, dirA, caA.Root(), spiffeid.RequireFromString("spiffe://b.test/ns/shop/sa/client"))
		before := refused(t, m, "node2", "tls_unknown_ca")
		bundles := x509bundle.NewSet(x509bundle.FromX509Authorities(caA.TrustDomain(), caA.Roots()), x509bundle.FromX509Authorities(caB.TrustDomain(), caB.Roots()))
		hb := netip.AddrPortFrom(m.Pod("server").IP, meshtest.HBONEPort)
		raw, err := m.Node("node1").Dial(ctx, "tcp4", hb.String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Client(raw, hbone.ClientConfig(forged, bundles, spiffeid.RequireFromString(serverID)))
		err = tc.HandshakeContext(ctx)
		if err == nil {
			// TLS 1.3: the server judges the client's certificate after
			// the client finished; its alert comes with the first read.
			_, err = tc.Read(make([]byte, 1))
		}
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("node2 accepted the forged certificate (err %v)", err)
		}
		waitRefused(t, m, "node2", "tls_unknown_ca", before+1)
	})

	restartNode2 := func(t *testing.T, bundle string) {
		t.Helper()
		bundleOfA.Store(bundle)
		if err := m.StopAgent(ctx, "node2"); err != nil {
			t.Fatal(err)
		}
		if err := m.StartAgent(ctx, "node2"); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("a.test's bundle file changed under a running agent is read again", func(t *testing.T) {
		// node2 starts with a bundle of a.test from another CA (the
		// client's certificates do not chain to it), then the file gets
		// a.test's real root, as a ConfigMap update would deliver it.
		other, err := ca.New(caA.TrustDomain(), ca.Options{})
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(dir, "a.test.pem")
		writeBundle(t, file, other.Roots())
		restartNode2(t, file)
		if reaches(m, "client", dst) {
			t.Fatal("node2 admitted the client with a bundle of another CA")
		}
		waitRefused(t, m, "node2", "tls_unknown_ca", 1)
		writeBundle(t, file, caA.Roots())
		ok := false
		for deadline := time.Now().Add(10 * time.Second); !ok && time.Now().Before(deadline); {
			if ok = reaches(m, "client", dst); !ok {
				time.Sleep(100 * time.Millisecond)
			}
		}
		if !ok {
			t.Fatal("node2 did not pick up a.test's new bundle within 10s (--federate-poll 200ms)")
		}
		st, err := m.Status(ctx, "node2")
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(st.Bundles, func(b admin.TrustBundle) bool { return b.TrustDomain == "a.test" })
		if i < 0 || st.Bundles[i].Reloads != 1 || len(st.Bundles[i].Roots) != 1 || st.Bundles[i].Failures != 0 {
			t.Fatalf("node2's bundles: %+v; want a.test's reloaded once", st.Bundles)
		}
		mfs, err := m.Metrics(ctx, "node2")
		if err != nil {
			t.Fatal(err)
		}
		if v, ok := mfs.Value("mantlet_trust_bundle_reloads_total", map[string]string{"trust_domain": "a.test", "federated": "true"}); !ok || v != 1 {
			t.Errorf("mantlet_trust_bundle_reloads_total{trust_domain=\"a.test\"} = %v (%v), want 1", v, ok)
		}
	})

	t.Run("without a.test's bundle node2 refuses the client", func(t *testing.T) {
		restartNode2(t, "")
		if reaches(m, "client", dst) {
			t.Fatal("node2 admitted a client of a trust domain it has no bundle for")
		}
		waitRefused(t, m, "node2", "tls_untrusted_domain", 1)
		var logged bool
		for deadline := time.Now().Add(10 * time.Second); !logged && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			logged = slices.ContainsFunc(m.Records("node2"), func(r map[string]any) bool {
				msg, _ := r["error"].(string)
				return r["msg"] == "ztunnel: refused" && r["reason"] == "tls_untrusted_domain" &&
					strings.Contains(msg, clientID+" presents an ID of trust domain a.test, for which this node holds no trust bundle")
			})
		}
		if !logged {
			t.Errorf("node2 did not log the refusal naming the client and its trust domain:\n%s", m.Logs("node2"))
		}
	})
}

// refused returns node's mantlet_ztunnel_refused_connections_total for
// reason (0 when the series is absent).
func refused(t *testing.T, m *meshtest.Mesh, node, reason string) float64 {
	t.Helper()
	mfs, err := m.Metrics(context.Background(), node)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := mfs.Value("mantlet_ztunnel_refused_connections_total", map[string]string{"response_flags": reason})
	return v
}

// waitRefused waits until node counted at least want refusals for reason.
func waitRefused(t *testing.T, m *meshtest.Mesh, node, reason string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := refused(t, m, node, reason)
		if v >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: mantlet_ztunnel_refused_connections_total{response_flags=%q} = %v, want at least %v", node, reason, v, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// writeBundle writes roots as a PEM bundle to file, whole or not at all
// (beside it, then renamed).
func writeBundle(t *testing.T, file string, roots []*x509.Certificate) {
	t.Helper()
	var out []byte
	for _, r := range roots {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	if err := os.WriteFile(file+".tmp", out, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(file+".tmp", file); err != nil {
		t.Fatal(err)
	}
}

// mintWithRootKey signs a certificate for id, whatever its trust domain,
// with the root key of the CA in dir: what a CA that overreaches (or its
// stolen key) could mint.
func mintWithRootKey(t *testing.T, dir string, root *x509.Certificate, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, ca.RootKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatal("no PEM in the root key file")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		t.Fatal(errors.New("the root key is no signer"))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		URIs:         []*url.URL{id.URL()},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}, root, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}
