package peerbench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// profile is the profiling pass after the rounds (Options.Profile): for
// every tunnel, perf's counts of system calls and context switches per
// echo round trip and a perf profile (kernel and user stacks) of a
// 1-stream upload and of the echo loop; for mantlet also the agents' Go
// CPU profiles from their admin API during the same two cases.
func (b *bench) profile(ctx context.Context) error {
	d := b.opts.Profile
	perf, perfErr := exec.LookPath("perf")
	if perfErr != nil {
		b.prog("perf is not installed (Debian: apt-get install linux-perf): only the agents' Go profiles are taken")
	}
	for _, p := range b.paths {
		if len(p.sides) == 0 {
			continue
		}
		if perfErr == nil {
			// Counts first, with nothing else attached to the processes.
			if err := b.phase(ctx, fmt.Sprintf("profile: perf stat of an echo loop for %v", d), []*path{p}, func(p *path) (int, error) {
				return 1, b.perfStatEcho(ctx, perf, p)
			}); err != nil {
				return err
			}
			for _, c := range []string{"1stream", "echo"} {
				if err := b.phase(ctx, fmt.Sprintf("profile: perf record of the %s case for %v", c, d), []*path{p}, func(p *path) (int, error) {
					return caseConns(c), b.perfRecord(ctx, perf, p, c)
				}); err != nil {
					return err
				}
			}
		}
		if !p.meshed {
			continue
		}
		for _, c := range []string{"1stream", "echo"} {
			if err := b.phase(ctx, fmt.Sprintf("profile: the agents' Go CPU profiles of the %s case for %v", c, d), []*path{p}, func(p *path) (int, error) {
				return caseConns(c), b.pprofCase(ctx, p, c)
			}); err != nil {
				return err
			}
		}
	}
	return nil
}

// caseConns is how many connections case c opens: the echo loop one,
// iperf3 its control connection and the stream.
func caseConns(c string) int {
	if c == "echo" {
		return 1
	}
	return 2
}

// load runs the case's traffic on p for the profile's length.
func (b *bench) load(ctx context.Context, p *path, c string) (roundTrips int, err error) {
	d := b.opts.Profile
	if c == "echo" {
		return p.dialer.echoFor(ctx, d)
	}
	_, _, err = p.dialer.throughput(ctx, 1, d)
	return 0, err
}

// during runs load(c) while fn runs for each side of p, concurrently.
func (b *bench) during(ctx context.Context, p *path, c string, fn func(ctx context.Context, side string, pids []int) error) (int, error) {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for name, s := range p.sides {
		pids, err := s.pids()
		if err != nil {
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx, name, pids); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s side: %w", name, err))
				mu.Unlock()
			}
		}()
	}
	// The tools attach first.
	time.Sleep(200 * time.Millisecond)
	n, err := b.load(ctx, p, c)
	wg.Wait()
	return n, errors.Join(append(errs, err)...)
}

// perfStatEcho counts the system calls and context switches of each side
// during an echo loop, per round trip.
func (b *bench) perfStatEcho(ctx context.Context, perf string, p *path) error {
	d := b.opts.Profile
	counts := map[string]map[string]float64{}
	var mu sync.Mutex
	n, err := b.during(ctx, p, "echo", func(ctx context.Context, side string, pids []int) error {
		cmd := exec.CommandContext(ctx, perf, "stat", "-x,", "-e", strings.Join(availableEvents(), ","),
			"-p", joinInts(pids), "--", "sleep", strconv.FormatFloat((d+400*time.Millisecond).Seconds(), 'f', 1, 64))
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("perf stat: %w: %s", err, bytes.TrimSpace(out))
		}
		c, err := parsePerfStat(out)
		if err != nil {
			return err
		}
		mu.Lock()
		counts[side] = c
		mu.Unlock()
		return os.WriteFile(filepath.Join(b.opts.Out, fmt.Sprintf("perf-stat-%s-%s-echo.csv", p.name, side)), out, 0o644)
	})
	if err != nil {
		return err
	}
	if n == 0 {
		return errors.New("no echo round trips")
	}
	for side, c := range counts {
		b.record("syscalls_per_echo", side, p.name, c["raw_syscalls:sys_enter"]/float64(n))
		b.record("ctxsw_per_echo", side, p.name, c["context-switches"]/float64(n))
		b.mu.Lock()
		b.profiles = append(b.profiles, fmt.Sprintf("perf-stat-%s-%s-echo.csv", p.name, side))
		b.mu.Unlock()
	}
	b.prog("profile: %s: %d echo round trips in %v", p.name, n, d)
	return nil
}

// perfEvents are what perfStatEcho counts: every system call and context
// switch (the figures), and the system calls a proxy's round trip is
// made of, one by one (in the CSV files only, to see which ones differ).
var perfEvents = []string{
	"raw_syscalls:sys_enter", "context-switches",
	"syscalls:sys_enter_read", "syscalls:sys_enter_write", "syscalls:sys_enter_readv", "syscalls:sys_enter_writev",
	"syscalls:sys_enter_recvfrom", "syscalls:sys_enter_sendto", "syscalls:sys_enter_recvmsg", "syscalls:sys_enter_sendmsg",
	"syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait", "syscalls:sys_enter_futex", "syscalls:sys_enter_nanosleep",
	"syscalls:sys_enter_sched_yield", "syscalls:sys_enter_getpid", "syscalls:sys_enter_tgkill",
}

// availableEvents returns perfEvents without the per-call tracepoints this
// kernel does not have (perf stat refuses to count any if one is missing).
func availableEvents() []string {
	var out []string
	for _, e := range perfEvents {
		name, ok := strings.CutPrefix(e, "syscalls:")
		if ok {
			_, err1 := os.Stat(filepath.Join("/sys/kernel/tracing/events/syscalls", name))
			_, err2 := os.Stat(filepath.Join("/sys/kernel/debug/tracing/events/syscalls", name))
			if err1 != nil && err2 != nil {
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

// parsePerfStat reads perf stat -x, output: value,unit,event,...
func parsePerfStat(out []byte) (map[string]float64, error) {
	m := map[string]float64{}
	for line := range strings.Lines(string(out)) {
		f := strings.Split(strings.TrimSpace(line), ",")
		if len(f) < 3 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue // "<not counted>", comments
		}
		m[f[2]] = v
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("perf stat printed no counts: %s", bytes.TrimSpace(out))
	}
	return m, nil
}

// perfRecord samples each side's stacks (user and kernel) during case c
// and writes perf's report of the hottest symbols.
func (b *bench) perfRecord(ctx context.Context, perf string, p *path, c string) error {
	d := b.opts.Profile
	_, err := b.during(ctx, p, c, func(ctx context.Context, side string, pids []int) error {
		data := filepath.Join(b.opts.Out, fmt.Sprintf("perf-%s-%s-%s.data", p.name, side, c))
		rec := exec.CommandContext(ctx, perf, "record", "-q", "-F", "499", "-g", "-o", data,
			"-p", joinInts(pids), "--", "sleep", strconv.FormatFloat((d+400*time.Millisecond).Seconds(), 'f', 1, 64))
		if out, err := rec.CombinedOutput(); err != nil {
			return fmt.Errorf("perf record: %w: %s", err, bytes.TrimSpace(out))
		}
		rep := exec.CommandContext(ctx, perf, "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.5")
		out, err := rep.Output()
		if err != nil {
			return fmt.Errorf("perf report: %w", err)
		}
		name := fmt.Sprintf("perf-%s-%s-%s.txt", p.name, side, c)
		if err := os.WriteFile(filepath.Join(b.opts.Out, name), out, 0o644); err != nil {
			return err
		}
		// The raw samples are large; the report is what a reader needs,
		// and a rerun makes new ones.
		_ = os.Remove(data)
		b.mu.Lock()
		b.profiles = append(b.profiles, name)
		b.mu.Unlock()
		return nil
	})
	return err
}

// pprofCase takes each agent's Go CPU profile from its admin socket during
// case c.
func (b *bench) pprofCase(ctx context.Context, p *path, c string) error {
	secs := int(b.opts.Profile.Round(time.Second) / time.Second)
	if secs < 1 {
		secs = 1
	}
	node := map[string]string{ClientSide: "node1", ServerSide: "node2"}
	_, err := b.during(ctx, p, c, func(ctx context.Context, side string, _ []int) error {
		sock := b.mesh.AdminSocket(node[side])
		client := &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}
		defer client.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://admin/debug/pprof/profile?seconds=%d", secs), nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("profile of the agent of %s: %w", node[side], err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return fmt.Errorf("profile of the agent of %s: %w", node[side], err)
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("profile of the agent of %s: %s: %s", node[side], resp.Status, bytes.TrimSpace(body))
		}
		name := fmt.Sprintf("pprof-%s-%s-%s.pb.gz", p.name, side, c)
		if err := os.WriteFile(filepath.Join(b.opts.Out, name), body, 0o644); err != nil {
			return err
		}
		b.mu.Lock()
		b.profiles = append(b.profiles, name)
		b.mu.Unlock()
		return nil
	})
	return err
}

func joinInts(vs []int) string {
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}
