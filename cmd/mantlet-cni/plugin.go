package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/mantlet/mantlet/cni"
)

// supportedVersions are the CNI spec versions whose configuration and
// previous result the plugin reads.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"}

// CNI error codes (CNI spec, "Error codes").
const (
	codeIncompatibleVersion = 1
	codeInvalidEnv          = 4
	codeDecode              = 6
	codeInvalidConfig       = 7
	codeTryAgainLater       = 11
)

// conf is the plugin's network configuration as the runtime gives it on
// stdin: the network's name and version, mantlet's settings, and the
// result of the plugins before it.
type conf struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Type       string `json:"type"`
	cni.PluginConfig
	// PrevResult is kept as it came, to be passed through unchanged.
	PrevResult json.RawMessage `json:"prevResult,omitempty"`
}

// prevResult is what the plugin reads of the previous result: the
// interfaces (the host end has no sandbox) and the addresses.
type prevResult struct {
	Interfaces []struct {
		Name    string `json:"name"`
		Sandbox string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []struct {
		Address string `json:"address"`
	} `json:"ips"`
}

// cniError is a CNI error result.
type cniError struct {
	CNIVersion string `json:"cniVersion"`
	Code       int    `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

func (e *cniError) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return e.Msg + ": " + e.Details
}

// run is the plugin: it reads the configuration from stdin and the
// CNI_* variables from getenv, writes the result (or the error) to
// stdout, and returns the exit status.
func run(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	version := "1.0.0"
	out, err := handle(stdin, getenv, &version)
	if err != nil {
		var ce *cniError
		if !errors.As(err, &ce) {
			ce = &cniError{Code: codeTryAgainLater, Msg: err.Error()}
		}
		ce.CNIVersion = version
		_ = json.NewEncoder(stdout).Encode(ce)
		fmt.Fprintln(stderr, "mantlet-cni:", ce.Error())
		return 1
	}
	if len(out) > 0 {
		_, _ = stdout.Write(out)
	}
	return 0
}

// handle runs one CNI command and returns what goes to stdout.
func handle(stdin io.Reader, getenv func(string) string, version *string) ([]byte, error) {
	cmd := getenv("CNI_COMMAND")
	if cmd == "VERSION" {
		return json.Marshal(map[string]any{"cniVersion": "1.0.0", "supportedVersions": supportedVersions})
	}
	raw, err := io.ReadAll(io.LimitReader(stdin, 1<<20))
	if err != nil {
		return nil, &cniError{Code: codeDecode, Msg: "read configuration", Details: err.Error()}
	}
	c, err := parseConf(raw)
	if c != nil && c.CNIVersion != "" {
		*version = c.CNIVersion
	}
	if err != nil {
		return nil, err
	}
	args := parseArgs(getenv("CNI_ARGS"))
	ns, name := args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"]
	req := &cni.Request{Namespace: ns, Name: name, UID: args["K8S_POD_UID"], ContainerID: getenv("CNI_CONTAINERID"), Netns: getenv("CNI_NETNS")}
	switch cmd {
	case "ADD", "CHECK":
		if len(c.PrevResult) == 0 {
			return nil, &cniError{Code: codeInvalidConfig, Msg: "no prevResult: mantlet-cni is a chained plugin; put it last in a network's plugins list"}
		}
		if ns == "" || name == "" || cni.Excluded(ns, c.excluded()) {
			// Not a Kubernetes pod, or a namespace that starts without
			// the agent: nothing to hold.
			return passThrough(c, cmd)
		}
		if err := fromPrevResult(c.PrevResult, req); err != nil {
			return nil, err
		}
		req.Command = cni.Add
		if cmd == "CHECK" {
			req.Command = cni.Check
		}
		if _, err := ask(c, req, time.Duration(c.timeout())*time.Second); err != nil {
			return nil, &cniError{Code: codeTryAgainLater,
				Msg: fmt.Sprintf("pod %s not started: the mantlet agent did not enroll it (pods of meshed namespaces wait for the node's agent; namespaces that start without it: %s)",
					req.Pod(), strings.Join(c.excluded(), ", ")),
				Details: err.Error()}
		}
		return passThrough(c, cmd)
	case "DEL":
		if ns != "" && name != "" && !cni.Excluded(ns, c.excluded()) {
			req.Command = cni.Del
			// Best effort: a DEL must never fail, the agent un-enrolls
			// departed pods on its own anyway.
			_, _ = ask(c, req, 5*time.Second)
		}
		return nil, nil
	case "GC", "STATUS":
		return nil, nil
	case "":
		return nil, &cniError{Code: codeInvalidEnv, Msg: "CNI_COMMAND is not set"}
	default:
		return nil, &cniError{Code: codeInvalidEnv, Msg: fmt.Sprintf("unknown CNI_COMMAND %q", cmd)}
	}
}

// parseConf decodes and checks the configuration.
func parseConf(raw []byte) (*conf, error) {
	var c conf
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, &cniError{Code: codeDecode, Msg: "decode configuration", Details: err.Error()}
	}
	if !slices.Contains(supportedVersions, c.CNIVersion) {
		return &c, &cniError{Code: codeIncompatibleVersion, Msg: fmt.Sprintf("cniVersion %q is not supported", c.CNIVersion),
			Details: "supported: " + strings.Join(supportedVersions, ", ")}
	}
	if c.TimeoutSeconds < 0 {
		return &c, &cniError{Code: codeInvalidConfig, Msg: fmt.Sprintf("timeoutSeconds %d: want a positive number", c.TimeoutSeconds)}
	}
	return &c, nil
}

func (c *conf) excluded() []string {
	if c.ExcludeNamespaces == nil {
		return cni.DefaultExcludedNamespaces
	}
	return c.ExcludeNamespaces
}

func (c *conf) timeout() int {
	if c.TimeoutSeconds == 0 {
		return cni.DefaultTimeout
	}
	return c.TimeoutSeconds
}

func (c *conf) socket() string {
	if c.Socket == "" {
		return cni.DefaultSocket
	}
	return c.Socket
}

// passThrough is the result of ADD: the previous result, unchanged. CHECK
// and a missing previous result print nothing.
func passThrough(c *conf, cmd string) ([]byte, error) {
	if cmd != "ADD" || len(c.PrevResult) == 0 {
		return nil, nil
	}
	return c.PrevResult, nil
}

// fromPrevResult fills the pod's addresses and host veth from the previous
// result.
func fromPrevResult(raw json.RawMessage, req *cni.Request) error {
	var pr prevResult
	if err := json.Unmarshal(raw, &pr); err != nil {
		return &cniError{Code: codeDecode, Msg: "decode prevResult", Details: err.Error()}
	}
	for _, ip := range pr.IPs {
		p, err := netip.ParsePrefix(ip.Address)
		if err != nil {
			return &cniError{Code: codeDecode, Msg: "decode prevResult", Details: fmt.Sprintf("ips: address %q: %v", ip.Address, err)}
		}
		req.IPs = append(req.IPs, p.Addr())
	}
	if len(req.IPs) == 0 {
		return &cniError{Code: codeInvalidConfig, Msg: "prevResult has no addresses: mantlet-cni must come after the plugin that gives the pod its address"}
	}
	for _, i := range pr.Interfaces {
		if i.Sandbox == "" && req.HostInterface == "" {
			req.HostInterface = i.Name
		}
	}
	return nil
}

// parseArgs parses CNI_ARGS (K=V;K=V).
func parseArgs(s string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			out[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return out
}

// ask sends req to the agent and waits for its answer.
func ask(c *conf, req *cni.Request, timeout time.Duration) (*cni.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	sock := c.socket()
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://mantlet-agent"+cni.Path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hresp, err := client.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("agent at %s unreachable: %w", sock, unwrapURL(err))
	}
	defer hresp.Body.Close()
	var resp cni.Response
	if err := json.NewDecoder(io.LimitReader(hresp.Body, 64<<10)).Decode(&resp); err != nil {
		return nil, fmt.Errorf("agent at %s: decode answer (HTTP %d): %w", sock, hresp.StatusCode, err)
	}
	if hresp.StatusCode != http.StatusOK || resp.Error != "" {
		return nil, fmt.Errorf("agent: %s", resp.Error)
	}
	return &resp, nil
}

// unwrapURL drops net/http's "Post \"http://...\":" prefix, which names a
// made-up URL.
func unwrapURL(err error) error {
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) && strings.HasPrefix(err.Error(), "Post ") {
		return ue.Unwrap()
	}
	return err
}
