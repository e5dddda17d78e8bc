package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	k8s "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/mantlet/mantlet/identity"
	"github.com/mantlet/mantlet/identity/ca"
	"github.com/mantlet/mantlet/identity/clusterca"
	"github.com/mantlet/mantlet/telemetry"
)

func init() {
	caCommands["serve"] = subcommand{"run the cluster CA service: sign node agents' CSRs for identities of pods on their node (keys in a Secret)", runCAServe}
}

// serviceAccountNamespaceFile is where a pod finds its namespace.
const serviceAccountNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

func runCAServe(ctx context.Context, e *env, args []string) error {
	flags := newFlagSet(e, "ca serve", "(--kubernetes | --kubeconfig F) [--namespace NS] [--trust-domain TD] --agents NS/SA[,...] [flags]")
	kubeconfig := flags.String("kubeconfig", "", "reach the API server with this kubeconfig (instead of --kubernetes)")
	inCluster := flags.Bool("kubernetes", false, "reach the API server with the pod's service account (in a Deployment)")
	namespace := flags.String("namespace", "", "`NS` holding the CA's Secret and the trust bundle's ConfigMap (default: the pod's namespace)")
	tdName := flags.String("trust-domain", identity.DefaultTrustDomain.Name(), "`TD`, the trust domain of the identities signed")
	inter := flags.Bool("intermediate", true, "a CA created on first start signs with an intermediate under its root")
	secret := flags.String("secret", clusterca.DefaultSecretName, "name of the Secret holding the CA (created on first start when absent; or made from 'mantlet ca init' files)")
	bundleCM := flags.String("bundle-configmap", clusterca.DefaultBundleConfigMap, "name of the ConfigMap the trust bundle is published in (key "+clusterca.BundleKey+")")
	audience := flags.String("audience", clusterca.DefaultAudience, "the one audience of the agents' tokens accepted")
	var agents listFlag
	flags.Var(&agents, "agents", "service accounts (`NS/SA`, repeated or comma-separated) of the node agents allowed to ask (required)")
	ttl := flags.Duration("svid-ttl", clusterca.DefaultSVIDTTL, "longest lifetime of the SVIDs signed")
	listen := flags.String("listen", ":"+strconv.Itoa(clusterca.DefaultPort), "listen address of the HTTPS API")
	metricsAddr := flags.String("metrics-addr", ":15014", "listen address of /metrics, /healthz and /readyz; empty disables them")
	serverID := flags.String("server-id", "", "SPIFFE ID of the service's own certificate (default spiffe://TD/ns/NS/sa/mantlet-ca)")
	var dnsNames listFlag
	flags.Var(&dnsNames, "dns", "DNS names added to the service's certificate (default mantlet-ca.NS.svc and mantlet-ca.NS.svc.cluster.local)")
	audit := flags.String("audit-log", "-", "where the JSON audit lines go: a file (appended) or - for stdout")
	replica := flags.String("replica", "", "name of this replica in the audit lines (default $POD_NAME, or the host name)")
	rate := flags.Float64("caller-rate", clusterca.DefaultCallerRate, "sign requests per second allowed per caller (per address, then per node)")
	burst := flags.Int("caller-burst", clusterca.DefaultCallerBurst, "burst of sign requests allowed per caller")
	reload := flags.Duration("reload", clusterca.DefaultReloadEvery, "how often the Secret is read again to follow a rotation")
	logFormat := flags.String("log-format", "text", "log format on stderr: text or json")
	if err := parseFlags(flags, args); err != nil {
		return err
	}
	if err := requireFlags(flags, "agents"); err != nil {
		return err
	}
	if (*kubeconfig == "") == !*inCluster {
		fmt.Fprintln(flags.Output(), "ca serve: give one of --kubernetes and --kubeconfig")
		flags.Usage()
		return errUsage
	}
	var h slog.Handler = slog.NewTextHandler(e.stderr, nil)
	if *logFormat == "json" {
		h = slog.NewJSONHandler(e.stderr, nil)
	}
	log := slog.New(h)

	td, err := spiffeid.TrustDomainFromString(*tdName)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", *tdName, err)
	}
	ns := *namespace
	if ns == "" {
		b, err := os.ReadFile(serviceAccountNamespaceFile)
		if err != nil {
			return fmt.Errorf("--namespace not given and the pod's namespace is unknown: %w", err)
		}
		ns = strings.TrimSpace(string(b))
	}
	sid, err := caServeServerID(td, ns, *serverID)
	if err != nil {
		return err
	}
	if len(dnsNames) == 0 {
		dnsNames = listFlag{"mantlet-ca." + ns + ".svc", "mantlet-ca." + ns + ".svc.cluster.local"}
	}
	name := *replica
	if name == "" {
		if name = e.getenv("POD_NAME"); name == "" {
			name, _ = os.Hostname()
		}
	}
	var auditW io.Writer = e.stdout
	if *audit != "-" {
		f, err := os.OpenFile(*audit, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("--audit-log: %w", err)
		}
		defer f.Close()
		auditW = f
	}

	client, err := kubeClient(*kubeconfig, "mantlet-ca/"+name)
	if err != nil {
		return err
	}
	srv, err := clusterca.New(ctx, clusterca.Config{
		Client: client, Namespace: ns, SecretName: *secret, BundleConfigMap: *bundleCM, TrustDomain: td, Intermediate: *inter,
		Audience: *audience, Agents: agents, SVIDTTL: *ttl, ServerID: sid, DNSNames: dnsNames, Replica: name, Audit: auditW,
		ReloadEvery: *reload, CallerRate: *rate, CallerBurst: *burst, Logger: log,
	})
	if err != nil {
		return err
	}
	lc := net.ListenConfig{}
	ln, err := lc.Listen(ctx, "tcp", *listen)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", *listen, err)
	}
	var msrv *http.Server
	if *metricsAddr != "" {
		mln, err := lc.Listen(ctx, "tcp", *metricsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("--metrics-addr %s: %w", *metricsAddr, err)
		}
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), telemetry.NewProcessCollector(), srv.Collector())
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", telemetry.MetricsHandler(reg))
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
			if ok, why := srv.Ready(); !ok {
				http.Error(w, why, http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		msrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := msrv.Serve(mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server failed", "error", err)
			}
		}()
		defer msrv.Close()
	}
	log.Info("cluster CA serving", "listen", ln.Addr().String(), "namespace", ns, "trust_domain", td.Name(), "server_id", sid.String(),
		"agents", strings.Join(agents, ","), "svid_ttl", ttl.String(), "replica", name)
	return srv.Run(ctx, ln)
}

// caServeServerID is --server-id, or spiffe://td/ns/<ns>/sa/mantlet-ca.
func caServeServerID(td spiffeid.TrustDomain, ns, flagValue string) (spiffeid.ID, error) {
	if flagValue == "" {
		return spiffeid.FromSegments(td, "ns", ns, "sa", "mantlet-ca")
	}
	id, err := spiffeid.FromString(flagValue)
	if err != nil {
		return id, fmt.Errorf("--server-id %q: %w", flagValue, err)
	}
	if !id.MemberOf(td) {
		return id, fmt.Errorf("--server-id %s is not of trust domain %s", id, td)
	}
	return id, nil
}

// rotateSecret takes a rotation step on the CA the cluster CA keeps in the
// Secret nsName (or only shows where it stands, for step "").
func rotateSecret(ctx context.Context, e *env, nsName, kubeconfig, step string) error {
	ns, name, ok := strings.Cut(nsName, "/")
	if !ok || ns == "" || name == "" {
		return fmt.Errorf("--secret %q: want NAMESPACE/NAME", nsName)
	}
	client, err := kubeClient(kubeconfig, "mantlet-ca-rotate")
	if err != nil {
		return err
	}
	var fn func(*ca.CA) (*ca.CA, error)
	if step != "" {
		fn = rotateSteps[step]
	}
	c, err := clusterca.RotateSecret(ctx, client, ns, name, fn)
	if err != nil {
		return err
	}
	again := "mantlet ca rotate --secret " + nsName
	if kubeconfig != "" {
		again += " --kubeconfig " + kubeconfig
	} else {
		again += " --kubernetes"
	}
	printRotation(e.stdout, c, step, again)
	return nil
}

// kubeClient reaches the API server with kubeconfig, or in the cluster
// when it is empty.
func kubeClient(kubeconfig, agent string) (*k8s.Clientset, error) {
	var (
		rc  *rest.Config
		err error
	)
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("the API server: %w", err)
	}
	rc.UserAgent = agent
	client, err := k8s.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("the API server: %w", err)
	}
	return client, nil
}
