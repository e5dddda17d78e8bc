package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/admin"
	"github.com/mantlet/mantlet/admin/admintest"
	"github.com/mantlet/mantlet/events"
	"github.com/mantlet/mantlet/source/file"
)

// runCLI runs mantlet with args against the fixture's admin socket (found
// through $MANTLET_ADMIN, as a user could set it).
func runCLI(t *testing.T, f *admintest.Fixture, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	e, out, errb := testEnv()
	e.getenv = func(k string) string {
		if k == adminEnv {
			return f.Addr
		}
		return ""
	}
	code = run(context.Background(), e, args)
	return code, out.String(), errb.String()
}

func lines(s ...string) string { return strings.Join(s, "\n") + "\n" }

func TestOperatorCommandsPrintTables(t *testing.T) {
	f := admintest.New(t)
	f.Flows.Add(admintest.Allowed(1))
	f.Flows.Add(admintest.Denied(2))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"status"}, lines(
			"Node:          node-a (mantlet v0.0.0-test)",
			"Ready:         yes: ready: 2 local pods enrolled, 0 pending, 2 veths attached",
			"Data path:     sk_lookup attached; listeners in the SOCKMAP: outbound, hbone; programs on 2 pod veths and 1 uplinks",
			"Workloads:     4 in the cluster, 3 on this node (2 enrolled, 0 pending); 1 services; snapshot generation 1",
			"Config:        /etc/mantlet/cluster.yaml: in force since 2026-11-25T11:00:00Z (3 edits applied, 1 rejected)",
			"Policies:      3 in force (generation 1)",
			"Certificates:  2 identities; 1 expiring within 2h, 0 expired, 1 failing to renew",
			"Flows:         3 open, 2 logged since start",
			"",
			"Problems:",
			"  - certificate of spiffe://cluster.local/ns/shop/sa/frontend expires in 30m0s",
			"  - certificate of spiffe://cluster.local/ns/shop/sa/frontend: 3 failed attempts, last: ca: connection refused")},
		{[]string{"workloads", "-n", "shop", "--local"}, lines(
			"NAMESPACE  NAME        IP           NODE    IDENTITY                                    MESH  STATE     MTLS",
			"shop       checkout-0  198.19.1.20  node-a  spiffe://cluster.local/ns/shop/sa/checkout  yes   enrolled  STRICT",
			"shop       frontend-0  198.19.1.10  node-a  spiffe://cluster.local/ns/shop/sa/frontend  yes   enrolled  PERMISSIVE")},
		{[]string{"certs"}, lines(
			"IDENTITY                                    SERIAL  ROOT  NOT AFTER             EXPIRES IN  STATUS",
			"spiffe://cluster.local/ns/shop/sa/checkout  c0ffee  -     2026-11-26T11:00:00Z  23h         ok",
			"spiffe://cluster.local/ns/shop/sa/frontend  beef    -     2026-11-25T12:30:00Z  30m         renewal failing (3 attempts): ca: connection refused")},
		{[]string{"policy", "check", "--from", "shop/frontend", "--to", "shop/payments", "--port", "443"}, lines(
			"Verdict:      DENIED (no-allow-matched)",
			"Why:          ALLOW policies select the destination but none of their rules matches: denied",
			"Policy:       none",
			"Source:       spiffe://cluster.local/ns/shop/sa/frontend",
			"Destination:  shop/payments-0 (spiffe://cluster.local/ns/shop/sa/payments) at 198.19.2.10:8443, mTLS mode PERMISSIVE, through service payments.shop.svc",
			"Policy set:   generation 1")},
		{[]string{"policy", "check", "--from", "shop/checkout", "--to", "198.19.2.10:8443"}, lines(
			"Verdict:      ALLOWED (allowed-by-policy)",
			"Why:          allowed by rule 0 of ALLOW policy shop/payments-allow-checkout",
			"Policy:       shop/payments-allow-checkout, rule 0 (ALLOW)",
			`Rule:         {"from":[{"principals":["spiffe://cluster.local/ns/shop/sa/checkout"]}],"to":{"ports":[8443]}}`,
			"Source:       spiffe://cluster.local/ns/shop/sa/checkout",
			"Destination:  shop/payments-0 (spiffe://cluster.local/ns/shop/sa/payments) at 198.19.2.10:8443, mTLS mode PERMISSIVE",
			"Policy set:   generation 1")},
		{[]string{"policy", "check", "--from", "shop/frontend", "--to", "shop/checkout-0", "--port", "80"}, lines(
			"Verdict:      ALLOWED (allowed-by-default)",
			"Why:          no policy selects the destination: allowed by default",
			"Policy:       none",
			"Source:       spiffe://cluster.local/ns/shop/sa/frontend",
			"Destination:  shop/checkout-0 (spiffe://cluster.local/ns/shop/sa/checkout) at 198.19.1.20:80, mTLS mode STRICT",
			"Policy set:   generation 1")},
		{[]string{"flows", "--verdict", "denied"}, lines(
			"TIME          DIR  SOURCE                             DESTINATION                       VERDICT  FLAG           BYTES →/←  POLICY",
			"12:00:00.000  in   shop/frontend-0 198.19.1.10:40000  shop/payments-0 198.19.2.10:8443  denied   policy_denied  0B/0B      -")},
		{[]string{"flows", "--namespace", "shop", "--last", "1"}, lines(
			"TIME          DIR  SOURCE                             DESTINATION                       VERDICT  FLAG           BYTES →/←  POLICY",
			"12:00:00.000  in   shop/frontend-0 198.19.1.10:40000  shop/payments-0 198.19.2.10:8443  denied   policy_denied  0B/0B      -")},
		{[]string{"flows", "--namespace", "web"}, lines(
			"TIME  DIR  SOURCE  DESTINATION  VERDICT  FLAG  BYTES →/←  POLICY")},
	} {
		code, out, errb := runCLI(t, f, c.args...)
		if code != 0 || out != c.want {
			t.Errorf("mantlet %s exited %d\nstdout:\n%s\nwant:\n%s\nstderr:\n%s", strings.Join(c.args, " "), code, out, c.want, errb)
		}
	}
}

// TestStatusShowsARejectedEdit: a rejected edit of the cluster file shows
// in every form of mantlet status, and does not make the node unready
// (the last good version is in force).
func TestStatusShowsARejectedEdit(t *testing.T) {
	f := admintest.New(t)
	f.Config.Rejected, f.Config.RejectedAt, f.Config.LastEditRejected = 2, admintest.Now.Add(-time.Minute), true
	f.Config.Problems = []string{"cluster.yaml: " + file.NoObjects}
	code, out, errb := runCLI(t, f, "status")
	for _, want := range []string{
		"\nConfig:        /etc/mantlet/cluster.yaml: last edit REJECTED at 2026-11-25T11:59:00Z; the version of 2026-11-25T11:00:00Z stays in force (3 edits applied, 2 rejected)\n",
		"\n  - config: last edit rejected at 2026-11-25T11:59:00Z: cluster.yaml: " + file.NoObjects + "\n",
	} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("mantlet status exited %d, stdout:\n%s\nwant in it:\n%s\nstderr:\n%s", code, out, want, errb)
		}
	}
	for _, format := range []string{"json", "yaml"} {
		code, out, errb := runCLI(t, f, "status", "-o", format)
		var st admin.Status
		var err error
		if format == "yaml" {
			err = yaml.Unmarshal([]byte(out), &st)
		} else {
			err = json.Unmarshal([]byte(out), &st)
		}
		if code != 0 || err != nil || !st.Config.LastEditRejected || !st.Config.RejectedAt.Equal(admintest.Now.Add(-time.Minute)) ||
			!slices.Equal(st.Config.LastEditProblems, f.Config.Problems) ||
			!slices.Contains(st.Problems, "config: last edit rejected at 2026-11-25T11:59:00Z: cluster.yaml: "+file.NoObjects) {
			t.Errorf("mantlet status -o %s exited %d (%v): %+v\nstderr:\n%s", format, code, err, st, errb)
		}
	}
}

func TestOperatorCommandsPrintJSONAndYAML(t *testing.T) {
	f := admintest.New(t)
	f.Flows.Add(admintest.Allowed(1))
	for _, c := range []struct {
		args  []string
		into  any
		check func(v any) bool
	}{
		{[]string{"status", "-o", "json"}, &admin.Status{}, func(v any) bool { return v.(*admin.Status).Snapshot.Workloads == 4 }},
		{[]string{"workloads", "-o", "yaml"}, &[]admin.Workload{}, func(v any) bool { return len(*v.(*[]admin.Workload)) == 4 }},
		{[]string{"certs", "--output", "json"}, &[]admin.Cert{}, func(v any) bool { return (*v.(*[]admin.Cert))[0].Serial == "c0ffee" }},
		{[]string{"policy", "check", "-o", "yaml", "--from", "198.19.1.30", "--to", "shop/frontend-0", "--port", "80"}, &admin.Check{},
			func(v any) bool {
				c := v.(*admin.Check)
				return c.Verdict == "denied" && c.Policy == "shop/deny-legacy" && c.Rule == 0 && !c.Source.MTLS
			}},
		{[]string{"flows", "-o", "json"}, &[]events.Flow{}, func(v any) bool {
			evs := *v.(*[]events.Flow)
			return len(evs) == 1 && evs[0].BytesReceived == 2048
		}},
	} {
		code, out, errb := runCLI(t, f, c.args...)
		if code != 0 {
			t.Errorf("mantlet %s exited %d: %s", strings.Join(c.args, " "), code, errb)
			continue
		}
		var err error
		if strings.Contains(strings.Join(c.args, " "), "yaml") {
			err = yaml.Unmarshal([]byte(out), c.into)
		} else {
			err = json.Unmarshal([]byte(out), c.into)
		}
		if err != nil || !c.check(c.into) {
			t.Errorf("mantlet %s: %v\n%s", strings.Join(c.args, " "), err, out)
		}
	}
}

func TestOperatorCommandErrorsSayWhatToDo(t *testing.T) {
	f := admintest.New(t)
	nowhere := filepath.Join(t.TempDir(), "admin.sock")
	for _, c := range []struct {
		args     []string
		code     int
		contains string
	}{
		{[]string{"status", "--admin", nowhere}, 1, "mantlet status: cannot reach the admin API at " + nowhere + ": dial unix " + nowhere +
			": connect: no such file or directory\nIs 'mantlet agent' running on this node? Point at it with --admin host:port, --admin /path/to/admin.sock or --node <name>\n"},
		{[]string{"workloads", "--node", "nosuchnode"}, 1, "cannot reach the admin API at /run/mantlet/nosuchnode/admin.sock"},
		{[]string{"policy", "check", "--from", "shop/checkout", "--to", "shop/nothing", "--port", "80"}, 1,
			"mantlet policy: admin API at " + f.Addr + ": to shop/nothing: no workload or service of that name (see mantlet workloads)\n"},
		{[]string{"policy", "check", "--from", "shop/checkout"}, 2, "--from and --to are required"},
		{[]string{"policy", "frobnicate"}, 2, `unknown subcommand "frobnicate"`},
		{[]string{"flows", "--verdict", "maybe"}, 2, `--verdict "maybe": want allowed or denied`},
		{[]string{"certs", "-o", "xml"}, 2, `-o "xml": want table, json or yaml`},
	} {
		code, _, errb := runCLI(t, f, c.args...)
		if code != c.code || !strings.Contains(errb, c.contains) {
			t.Errorf("mantlet %s exited %d, stderr:\n%s\nwant exit %d and:\n%s", strings.Join(c.args, " "), code, errb, c.code, c.contains)
		}
	}

	f.Ready, f.Reason = false, "not ready: sk_lookup program not attached"
	code, out, errb := runCLI(t, f, "status")
	if code != 1 || !strings.Contains(out, "Ready:         NO: not ready: sk_lookup program not attached") ||
		errb != "mantlet status: node node-a is not ready: not ready: sk_lookup program not attached\n" {
		t.Errorf("unready status exited %d\nstdout:\n%s\nstderr:\n%s", code, out, errb)
	}
}

// TestFlowsFollowStreamsNewDenials reads the streamed lines through a pipe
// as they come.
func TestFlowsFollowStreamsNewDenials(t *testing.T) {
	f := admintest.New(t)
	f.Flows.Add(admintest.Denied(1))
	pr, pw := io.Pipe()
	e, _, errb := testEnv()
	e.stdout = pw
	e.getenv = func(k string) string {
		if k == adminEnv {
			return f.Addr
		}
		return ""
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, e, []string{"flows", "--follow", "--verdict", "denied", "-o", "json"})
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	next := func() events.Flow {
		t.Helper()
		got := make(chan events.Flow, 1)
		go func() {
			var ev events.Flow
			if sc.Scan() {
				json.Unmarshal(sc.Bytes(), &ev)
			}
			got <- ev
		}()
		// New events are added until one arrives: the follower subscribes
		// asynchronously.
		deadline := time.After(5 * time.Second)
		for {
			select {
			case ev := <-got:
				return ev
			case <-time.After(50 * time.Millisecond):
				f.Flows.Add(admintest.Allowed(99))
				f.Flows.Add(admintest.Denied(2))
			case <-deadline:
				t.Fatal("nothing streamed")
			}
		}
	}
	if ev := next(); ev.ID != 1 {
		t.Fatalf("first line: flow %d, want the recent denial 1", ev.ID)
	}
	if ev := next(); ev.ID != 2 || ev.Verdict != events.Denied {
		t.Fatalf("streamed flow %+v, want the new denial 2", ev)
	}
	cancel()
	go io.Copy(io.Discard, pr)
	if c := <-code; c != 0 {
		t.Errorf("mantlet flows --follow exited %d after Ctrl-C: %s", c, errb)
	}
}
