package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/telemetry"
)

// ErrUnreachable is matched (errors.Is) by the Client's errors when
// nothing answers at the admin address.
var ErrUnreachable = errors.New("admin API unreachable")

// UnreachableError says that nothing answered at Addr.
type UnreachableError struct {
	Addr string
	Err  error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("cannot reach the admin API at %s: %v", e.Addr, e.Err)
}

// Unwrap returns the dial error.
func (e *UnreachableError) Unwrap() error { return e.Err }

// Is matches ErrUnreachable.
func (e *UnreachableError) Is(target error) bool { return target == ErrUnreachable }

// Client talks to a node's admin API.
type Client struct {
	addr string // as given, for messages
	base string // http://host:port
	hc   *http.Client
}

// NewClient returns a client for addr: host:port, http://host:port, or a
// unix socket as unix:/path or an absolute path.
func NewClient(addr string) (*Client, error) {
	c := &Client{addr: addr}
	switch {
	case strings.HasPrefix(addr, "unix:") || strings.HasPrefix(addr, "/"):
		path := strings.TrimPrefix(addr, "unix:")
		c.base = "http://admin"
		c.hc = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		}}
	case strings.HasPrefix(addr, "http://"):
		c.base = strings.TrimSuffix(addr, "/")
		c.hc = &http.Client{Transport: &http.Transport{}}
	default:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("admin address %q: want host:port, http://host:port, unix:/path or /path", addr)
		}
		c.base = "http://" + addr
		c.hc = &http.Client{Transport: &http.Transport{}}
	}
	return c, nil
}

// Addr returns the address the client was made for.
func (c *Client) Addr() string { return c.addr }

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

func (c *Client) do(ctx context.Context, path string, q url.Values) (*http.Response, error) {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, &UnreachableError{Addr: c.addr, Err: unwrapURL(err)}
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var e Error
		if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e) != nil || e.Error == "" {
			e.Error = resp.Status
		}
		return nil, fmt.Errorf("admin API at %s: %s", c.addr, e.Error)
	}
	return resp, nil
}

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func (c *Client) get(ctx context.Context, path string, q url.Values, v any) error {
	resp, err := c.do(ctx, path, q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("admin API at %s: %s: %w", c.addr, path, err)
	}
	return nil
}

// Status returns /v1/status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var v Status
	return v, c.get(ctx, "/v1/status", nil, &v)
}

// Workloads returns /v1/workloads, of namespace ns only if not empty.
func (c *Client) Workloads(ctx context.Context, ns string) ([]Workload, error) {
	var v []Workload
	return v, c.get(ctx, "/v1/workloads", query("namespace", ns), &v)
}

// Services returns /v1/services, of namespace ns only if not empty.
func (c *Client) Services(ctx context.Context, ns string) ([]Service, error) {
	var v []Service
	return v, c.get(ctx, "/v1/services", query("namespace", ns), &v)
}

// Policies returns /v1/policies.
func (c *Client) Policies(ctx context.Context) (Policies, error) {
	var v Policies
	return v, c.get(ctx, "/v1/policies", nil, &v)
}

// Certs returns /v1/certs.
func (c *Client) Certs(ctx context.Context) ([]Cert, error) {
	var v []Cert
	return v, c.get(ctx, "/v1/certs", nil, &v)
}

// Datapath returns /v1/datapath.
func (c *Client) Datapath(ctx context.Context) (DatapathInfo, error) {
	var v DatapathInfo
	return v, c.get(ctx, "/v1/datapath", nil, &v)
}

// Check asks /v1/policy/check; port may be 0 when to carries one.
func (c *Client) Check(ctx context.Context, from, to string, port uint16) (Check, error) {
	q := url.Values{"from": {from}, "to": {to}}
	if port != 0 {
		q.Set("port", strconv.Itoa(int(port)))
	}
	var v Check
	return v, c.get(ctx, "/v1/policy/check", q, &v)
}

// Flows returns up to limit recent flow events passing f (0: all the
// node keeps).
func (c *Client) Flows(ctx context.Context, f telemetry.FlowFilter, limit int) ([]events.Flow, error) {
	var v []events.Flow
	return v, c.get(ctx, "/v1/flows", flowQuery(f, limit), &v)
}

// Follow streams flow events passing f, starting with up to last recent
// ones, until ctx is done or fn returns an error. lost is called when the
// node dropped events because the stream fell behind. It returns nil when
// ctx ends.
func (c *Client) Follow(ctx context.Context, f telemetry.FlowFilter, last int, fn func(events.Flow) error, lost func(uint64)) error {
	q := flowQuery(f, last)
	q.Set("follow", "1")
	resp, err := c.do(ctx, "/v1/flows", q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var probe struct {
			Event string `json:"event"`
			Lost  uint64 `json:"lost"`
		}
		if err := json.Unmarshal(sc.Bytes(), &probe); err != nil {
			return fmt.Errorf("admin API at %s: flow stream: %w", c.addr, err)
		}
		if probe.Event == "lost" {
			if lost != nil {
				lost(probe.Lost)
			}
			continue
		}
		var ev events.Flow
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("admin API at %s: flow stream: %w", c.addr, err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("admin API at %s: flow stream: %w", c.addr, err)
	}
	return fmt.Errorf("admin API at %s: the flow stream ended (agent stopped?)", c.addr)
}

func flowQuery(f telemetry.FlowFilter, limit int) url.Values {
	q := url.Values{}
	for k, v := range map[string]string{"verdict": f.Verdict, "namespace": f.Namespace, "workload": f.Workload, "event": f.Event} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	return q
}

func query(k, v string) url.Values {
	if v == "" {
		return nil
	}
	return url.Values{k: {v}}
}
