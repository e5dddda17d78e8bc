package kubecluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"time"

	"github.com/mantlet/mantlet/admin"
)

// AdminAddr is where the chart's agent answers its admin API, inside its
// node's network namespace.
const AdminAddr = "127.0.0.1:15000"

// WaitAgentMeshes waits until node's agent would carry a connection from
// from (a pod IP, namespace/serviceaccount or SPIFFE ID) to to (ip:port: a
// pod's, or a Service's virtual IP and port) over the mesh, to the meshed
// workload at endpoint: it asks the agent's policy check, which resolves
// the destination as the ztunnel does.
//
// Each agent learns pods and Services from its own watch of the API
// server, so it can learn a new one after the API server (and kube-proxy)
// show it; until then the node's ztunnel sees a destination outside the
// mesh, and passes a connection to it through in plaintext
// (docs/kubernetes.md). A pod's Meshed condition says only that its own
// node's agent enrolled it.
func (c *Cluster) WaitAgentMeshes(ctx context.Context, node *Node, from, to string, endpoint netip.Addr) error {
	hc := node.adminClient()
	defer hc.CloseIdleConnections()
	q := url.Values{"from": {from}, "to": {to}}
	u := "http://" + AdminAddr + "/v1/policy/check?" + q.Encode()
	return c.poll(ctx, fmt.Sprintf("the agent on %s to mesh %s -> %s", node.Name, from, to), func() (bool, string) {
		var res admin.Check
		if err := getJSON(ctx, hc, u, &res); err != nil {
			return false, err.Error()
		}
		if !res.Destination.Meshed || res.Destination.IP != endpoint.String() {
			return false, fmt.Sprintf("it resolves %s to %s, meshed %t (want the meshed %s)", to, res.Destination.IP, res.Destination.Meshed, endpoint)
		}
		return true, ""
	})
}

// adminClient returns an HTTP client whose connections are made inside the
// node's network namespace, where its agent's admin API listens.
func (n *Node) adminClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return n.Testbed.Dial(ctx, network, addr)
	}}}
}

// getJSON GETs u and decodes the 200 answer's JSON body into v.
func getJSON(ctx context.Context, hc *http.Client, u string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}
