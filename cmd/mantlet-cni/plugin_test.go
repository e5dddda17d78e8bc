package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"go/parser"
	"go/token"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/mantlet/mantlet/cni"
)

// fakeAgent records what the plugin asks and answers with err (nil: the
// pod is enrolled).
type fakeAgent struct {
	mu   sync.Mutex
	got  []cni.Request
	err  error
	sock string
}

func (f *fakeAgent) Add(_ context.Context, r *cni.Request) (cni.Response, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, *r)
	if f.err != nil {
		return cni.Response{}, f.err
	}
	return cni.Response{Meshed: true, Ifindex: 7}, nil
}

func (f *fakeAgent) Del(_ context.Context, r *cni.Request) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, *r)
	return nil
}

func (f *fakeAgent) requests() []cni.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]cni.Request(nil), f.got...)
}

// startAgent serves a fake agent on a socket of the test.
func startAgent(t *testing.T, err error) *fakeAgent {
	t.Helper()
	f := &fakeAgent{err: err, sock: filepath.Join(t.TempDir(), "cni.sock")}
	ln, lerr := cni.Listen(f.sock)
	if lerr != nil {
		t.Fatal(lerr)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = cni.Serve(ctx, ln, f, cni.ServerOptions{})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return f
}

// prev is a ptp plugin's result (CNI 0.4.0): the host veth, the pod's
// interface and its address.
const prev = `{"cniVersion":"0.4.0","interfaces":[{"name":"veth1a2b3c4d","mac":"aa:bb:cc:dd:ee:01"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/var/run/netns/cni-1"}],"ips":[{"version":"4","interface":1,"address":"198.19.1.11/24","gateway":"198.19.1.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}`

func config(sock, extra string) string {
	return `{"cniVersion":"0.4.0","name":"kubecluster","type":"mantlet-cni","agentSocket":"` + sock + `"` + extra + `,"prevResult":` + prev + `}`
}

const podArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"

func invoke(stdin, command, args string) (code int, stdout, stderr string) {
	env := map[string]string{"CNI_COMMAND": command, "CNI_ARGS": args, "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/cni-1", "CNI_IFNAME": "eth0"}
	var out, errOut bytes.Buffer
	code = run(strings.NewReader(stdin), &out, &errOut, func(k string) string { return env[k] })
	return code, out.String(), errOut.String()
}

// cniErr decodes a CNI error result.
func cniErr(t *testing.T, out string) cniError {
	t.Helper()
	var e cniError
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatalf("stdout is no CNI error: %v: %q", err, out)
	}
	return e
}

func TestAddWaitsForTheAgentAndPassesThePreviousResultThrough(t *testing.T) {
	f := startAgent(t, nil)
	code, out, errOut := invoke(config(f.sock, ""), "ADD", podArgs)
	if code != 0 {
		t.Fatalf("exit %d: %s %s", code, out, errOut)
	}
	if out != prev {
		t.Errorf("result:\n%s\nwant the previous result unchanged:\n%s", out, prev)
	}
	got := f.requests()
	want := cni.Request{Command: cni.Add, Namespace: "shop", Name: "cart-1", UID: "uid-1", ContainerID: "abc", Netns: "/var/run/netns/cni-1",
		IPs: []netip.Addr{netip.MustParseAddr("198.19.1.11")}, HostInterface: "veth1a2b3c4d"}
	if len(got) != 1 || !equalRequest(got[0], want) {
		t.Errorf("the agent was asked %+v, want %+v", got, want)
	}
}

func equalRequest(a, b cni.Request) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

func TestAddFailsClosedWhenTheAgentCannotEnrollThePod(t *testing.T) {
	refusing := startAgent(t, errors.New("pod shop/cart-1 not enrolled within 25s: find veth: no route"))
	for _, tc := range []struct {
		name, sock, want string
	}{
		{"no agent listens", filepath.Join(t.TempDir(), "absent.sock"), "unreachable: dial unix"},
		{"the agent says why", refusing.sock, "agent: pod shop/cart-1 not enrolled within 25s: find veth: no route"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := invoke(config(tc.sock, ""), "ADD", podArgs)
			if code == 0 {
				t.Fatalf("ADD succeeded (%s): a meshed pod would start uncaptured", out)
			}
			e := cniErr(t, out)
			wantMsg := "pod shop/cart-1 not started: the mantlet agent did not enroll it (pods of meshed namespaces wait for the node's agent; namespaces that start without it: kube-system)"
			if e.Code != codeTryAgainLater || e.Msg != wantMsg || !strings.Contains(e.Details, tc.want) || e.CNIVersion != "0.4.0" {
				t.Errorf("error %+v, want code 11, msg %q, details with %q", e, wantMsg, tc.want)
			}
			if !strings.Contains(errOut, wantMsg) {
				t.Errorf("stderr %q does not say why", errOut)
			}
		})
	}
}

func TestExcludedNamespacesAndOtherPodsStartWithoutTheAgent(t *testing.T) {
	absent := filepath.Join(t.TempDir(), "absent.sock")
	for _, tc := range []struct{ name, extra, args string }{
		{"kube-system by default", "", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"},
		{"a configured namespace", `,"excludeNamespaces":["infra","shop"]`, podArgs},
		{"not a Kubernetes pod", "", "IgnoreUnknown=1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := invoke(config(absent, tc.extra), "ADD", tc.args)
			if code != 0 || out != prev {
				t.Errorf("exit %d, stdout %q, stderr %q; want the previous result", code, out, errOut)
			}
		})
	}
	// Configured exclusions replace the default ones.
	if code, _, _ := invoke(config(absent, `,"excludeNamespaces":["infra"]`), "ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"); code == 0 {
		t.Error("kube-system started without the agent although the configuration excludes only infra")
	}
}

func TestDelNeverFails(t *testing.T) {
	f := startAgent(t, nil)
	for _, sock := range []string{f.sock, filepath.Join(t.TempDir(), "absent.sock")} {
		// The runtime may give DEL no previous result.
		conf := `{"cniVersion":"1.0.0","name":"k","type":"mantlet-cni","agentSocket":"` + sock + `"}`
		if code, out, errOut := invoke(conf, "DEL", podArgs); code != 0 || out != "" {
			t.Errorf("DEL (agent at %s): exit %d, stdout %q, stderr %q", sock, code, out, errOut)
		}
	}
	if got := f.requests(); len(got) != 1 || got[0].Command != cni.Del || got[0].Pod() != "shop/cart-1" {
		t.Errorf("the agent was told %+v, want one DEL of shop/cart-1", got)
	}
}

func TestConfigurationErrors(t *testing.T) {
	absent := filepath.Join(t.TempDir(), "absent.sock")
	for _, tc := range []struct {
		name, stdin, command string
		code                 int
		msg                  string
	}{
		{"not JSON", "{", "ADD", codeDecode, "decode configuration"},
		{"unknown version", `{"cniVersion":"9.9.9","name":"k","type":"mantlet-cni"}`, "ADD", codeIncompatibleVersion, `cniVersion "9.9.9" is not supported`},
		{"not chained", `{"cniVersion":"1.0.0","name":"k","type":"mantlet-cni"}`, "ADD", codeInvalidConfig, "no prevResult: mantlet-cni is a chained plugin; put it last in a network's plugins list"},
		{"no address before it", `{"cniVersion":"1.0.0","name":"k","type":"mantlet-cni","agentSocket":"` + absent + `","prevResult":{"cniVersion":"1.0.0","interfaces":[],"ips":[]}}`, "ADD", codeInvalidConfig, "prevResult has no addresses: mantlet-cni must come after the plugin that gives the pod its address"},
		{"negative timeout", `{"cniVersion":"1.0.0","name":"k","type":"mantlet-cni","timeoutSeconds":-1}`, "ADD", codeInvalidConfig, "timeoutSeconds -1: want a positive number"},
		{"no command", config(absent, ""), "", codeInvalidEnv, "CNI_COMMAND is not set"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, _ := invoke(tc.stdin, tc.command, podArgs)
			if code == 0 {
				t.Fatalf("exit 0, stdout %q", out)
			}
			if e := cniErr(t, out); e.Code != tc.code || e.Msg != tc.msg {
				t.Errorf("error %+v, want code %d msg %q", e, tc.code, tc.msg)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := invoke("", "VERSION", "")
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil || v.CNIVersion != "1.0.0" || strings.Join(v.SupportedVersions, ",") != "0.3.0,0.3.1,0.4.0,1.0.0" {
		t.Errorf("VERSION: exit %d, %q", code, out)
	}
}

// TestThePluginUsesTheStandardLibraryOnly keeps the plugin a small binary
// that the runtime starts fast for every pod: it and package cni import
// the standard library and each other, nothing else.
func TestThePluginUsesTheStandardLibraryOnly(t *testing.T) {
	for _, dir := range []string{".", "../../cni"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			pf, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range pf.Imports {
				p, _ := strconv.Unquote(imp.Path.Value)
				first, _, _ := strings.Cut(p, "/")
				if strings.Contains(first, ".") && p != "github.com/mantlet/mantlet/cni" {
					t.Errorf("%s imports %s", f, p)
				}
			}
		}
	}
}
