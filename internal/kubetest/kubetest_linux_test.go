//go:build linux

package kubetest

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/mantlet/mantlet/internal/privtest"
	"github.com/mantlet/mantlet/internal/testbed"
)

// helperEnv makes the test binary a client that reads the kubeconfig the
// variable names (see helperClient), instead of running tests.
const helperEnv = "MANTLET_KUBETEST_CLIENT_KUBECONFIG"

// helperAnswer is what the helper client prints.
type helperAnswer struct {
	User  string `json:"user"`
	Nodes int    `json:"nodes"`
	Error string `json:"error,omitempty"`
}

// helperClient is an agent's first steps, in a process of its own: load
// the kubeconfig, ask who it is, list the nodes. It prints a helperAnswer
// and returns the exit code.
func helperClient(kubeconfig string) int {
	answer := func() helperAnswer {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return helperAnswer{Error: err.Error()}
		}
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return helperAnswer{Error: err.Error()}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		r, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			return helperAnswer{Error: "self subject review: " + err.Error()}
		}
		nodes, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return helperAnswer{User: r.Status.UserInfo.Username, Error: "list nodes: " + err.Error()}
		}
		return helperAnswer{User: r.Status.UserInfo.Username, Nodes: len(nodes.Items)}
	}()
	b, _ := json.Marshal(answer)
	fmt.Println(string(b))
	if answer.Error != "" {
		return 1
	}
	return 0
}

func TestAgentOnANodeReachesTheAPIServerOverTheUnderlay(t *testing.T) {
	privtest.Require(t)
	bin := RequireBinaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	spec := testbed.SimpleSpec(2, 1, "default")
	spec.ControlPlane = true
	tb, err := testbed.New(ctx, spec, testbed.WithStateDir(t.TempDir()), testbed.WithLogger(slog.New(slog.NewTextHandler(testWriter{t}, nil))))
	if err != nil {
		t.Fatalf("testbed: %v", err)
	}
	t.Cleanup(func() {
		if err := tb.Close(); err != nil {
			t.Errorf("testbed: %v", err)
		}
	})
	s := start(t, Options{ControlPlane: tb.ControlPlane(), Binaries: &bin})
	if want := "https://198.18.0.254:6443"; s.URL != want {
		t.Errorf("URL %s, want %s", s.URL, want)
	}

	// The agents' account may read nodes, as the chart will let it.
	c := s.Admin()
	token, err := s.ServiceAccountToken(ctx, "mantlet-system", "mantlet-agent")
	if err != nil {
		t.Fatal(err)
	}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "node-reader"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"list"}}},
	}
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "mantlet-agent-reads-nodes"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "node-reader"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "mantlet-agent", Namespace: "mantlet-system"}},
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := s.Kubeconfig(token)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kubeconfig, 0o600); err != nil {
		t.Fatal(err)
	}

	capture, err := tb.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A process on node1, as an agent runs: the test binary as a client.
	// The binding may take a moment to reach the authorizer: a refused
	// list is tried again.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var answer helperAnswer
	deadline := time.Now().Add(time.Minute)
	for {
		cmd := tb.Node("node1").Command(ctx, self)
		cmd.Env = append(os.Environ(), helperEnv+"="+path)
		out, err := cmd.Output()
		answer = helperAnswer{}
		if jerr := json.Unmarshal(out, &answer); jerr != nil {
			t.Fatalf("client on node1: %v, %v: %q", err, jerr, out)
		}
		if err == nil || !strings.Contains(answer.Error, "forbidden") || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	pkts, cerr := capture.Stop()
	if answer.Error != "" || answer.User != "system:serviceaccount:mantlet-system:mantlet-agent" {
		t.Fatalf("client on node1: %+v; want user system:serviceaccount:mantlet-system:mantlet-agent and no error", answer)
	}
	if cerr != nil {
		t.Fatalf("capture: %v", cerr)
	}
	// Its connection crossed the underlay: from node1's uplink to the
	// control plane's address, as TLS (the token is not in clear).
	var toAPI int
	for _, p := range pkts {
		if p.Node == "node1" && p.Src.Addr() == tb.Node("node1").IP && p.Dst == s.Addr {
			toAPI++
		}
	}
	if toAPI == 0 {
		t.Errorf("the capture of the underlay (%d packets) has none from node1 to %s", len(pkts), s.Addr)
	}
	if testbed.Contains(pkts, []byte(token)) || testbed.Contains(pkts, []byte("mantlet-agent")) {
		t.Error("the token or the account's name crossed the underlay in clear")
	}

	// The test's own admin client reaches it too, from inside the control
	// plane's namespace.
	if _, err := c.CoreV1().Namespaces().Get(ctx, "mantlet-system", metav1.GetOptions{}); err != nil {
		t.Errorf("admin client: %v", err)
	}
}
