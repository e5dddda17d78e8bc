package peerbench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mantlet/mantlet/internal/report"
)

// Results is what a run measured: bench.json.
type Results struct {
	// Started and Took time the run.
	Started time.Time `json:"started"`
	Took    string    `json:"took"`
	// Machine describes the machine and its load when the run ended.
	Machine string `json:"machine"`
	// Settings are the options of the run.
	Settings Settings `json:"settings"`
	// Paths are the paths, measured or skipped, in the order of the
	// table.
	Paths []PathResult `json:"paths"`
	// Figures hold the values per path, one figure (and side) each.
	Figures []Figure `json:"figures"`
	// Ratios compare every path with every other, round by round.
	Ratios []Ratio `json:"ratios"`
	// Profiles lists the profile files written, relative to the results
	// folder.
	Profiles []string `json:"profiles,omitempty"`
}

// Settings are the options of a run, in the JSON.
type Settings struct {
	Rounds       int    `json:"rounds"`
	Duration     string `json:"throughput_duration"`
	RoundTrips   int    `json:"echo_round_trips"`
	ConnDuration string `json:"conn_duration"`
	ConnClients  int    `json:"conn_clients"`
	IdleConns    int    `json:"idle_conns"`
	Settle       string `json:"settle"`
	Profile      string `json:"profile,omitempty"`
}

// PathResult describes one path.
type PathResult struct {
	Name    string `json:"name"`
	About   string `json:"about,omitempty"`
	Version string `json:"version,omitempty"`
	// Skipped says why a peer was not measured ("" when it was).
	Skipped string `json:"skipped,omitempty"`
	// Captured and Attempted count the connections node1's ztunnel took
	// from the client during this path's measurements, and those the
	// client opened.
	Captured  uint64 `json:"captured,omitempty"`
	Attempted uint64 `json:"attempted,omitempty"`
	// Received is the bytes the iperf3 server received over all the
	// throughput measurements; Written, per side, the bytes the tunnel's
	// processes wrote meanwhile (wchar of /proc/<pid>/io): at least
	// Received when the traffic went through them.
	Received uint64            `json:"received_bytes,omitempty"`
	Written  map[string]uint64 `json:"tunnel_written_bytes,omitempty"`
}

// Figure is one measured quantity.
type Figure struct {
	Key    string `json:"key"`
	Title  string `json:"title"`
	Unit   string `json:"unit"`
	Better string `json:"better"`
	// Side is "client" or "server" for the tunnel's processes on one side;
	// empty for figures of the whole path.
	Side string `json:"side,omitempty"`
	// Values per path name; a path without a value here has none to give
	// (direct has no tunnel) or was skipped.
	Values map[string]Stat `json:"values"`
}

// Ratio is Path's figure over To's, per round.
type Ratio struct {
	Figure string `json:"figure"`
	Side   string `json:"side,omitempty"`
	Path   string `json:"path"`
	To     string `json:"to"`
	Stat
}

// results gathers what the run measured.
func (b *bench) results(start time.Time) *Results {
	o := b.opts
	r := &Results{
		Started: start.UTC(),
		Took:    time.Since(start).Round(time.Second).String(),
		Machine: MachineSummary(),
		Settings: Settings{Rounds: o.Rounds, Duration: o.Duration.String(), RoundTrips: o.RoundTrips,
			ConnDuration: o.ConnDuration.String(), ConnClients: connWorkers, IdleConns: o.IdleConns, Settle: o.Settle.String()},
	}
	if o.Profile > 0 {
		r.Settings.Profile = o.Profile.String()
	}
	var names []string
	for _, p := range b.paths {
		r.Paths = append(r.Paths, PathResult{Name: p.name, About: p.about, Version: p.version, Captured: p.captured, Attempted: p.attempted, Received: p.received, Written: p.written})
		names = append(names, p.name)
	}
	for _, peer := range o.Peers {
		if why, ok := b.skipped[peer]; ok {
			r.Paths = append(r.Paths, PathResult{Name: peer, Skipped: why})
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, fd := range figureDefs {
		sides := []string{""}
		if fd.tunnel {
			sides = []string{ClientSide, ServerSide}
		}
		for _, s := range sides {
			vals := b.samples[fd.key][s]
			if len(vals) == 0 {
				continue
			}
			f := Figure{Key: fd.key, Title: fd.title, Unit: fd.unit, Better: fd.better, Side: s, Values: map[string]Stat{}}
			for _, n := range names {
				if v := vals[n]; len(v) > 0 {
					f.Values[n] = newStat(v)
				}
			}
			r.Figures = append(r.Figures, f)
			for _, a := range names {
				for _, c := range names {
					if a == c {
						continue
					}
					if st, ok := ratioStat(vals[a], vals[c]); ok {
						r.Ratios = append(r.Ratios, Ratio{Figure: fd.key, Side: s, Path: a, To: c, Stat: st})
					}
				}
			}
		}
	}
	r.Profiles = b.profiles
	return r
}

// ratio returns the ratio of path to "to" for a figure and side.
func (r *Results) ratio(fig, side, path, to string) (Stat, bool) {
	for _, x := range r.Ratios {
		if x.Figure == fig && x.Side == side && x.Path == path && x.To == to {
			return x.Stat, true
		}
	}
	return Stat{}, false
}

// measured returns the names of the measured paths.
func (r *Results) measured() []string {
	var out []string
	for _, p := range r.Paths {
		if p.Skipped == "" {
			out = append(out, p.Name)
		}
	}
	return out
}

// Table prints the results as text.
func (r *Results) Table(w io.Writer) error {
	paths := r.measured()
	header := append([]string{"median (range) of " + fmt.Sprint(r.Settings.Rounds) + " rounds"}, paths...)
	var others []string
	for _, p := range paths {
		if p != Mantlet {
			others = append(others, p)
			header = append(header, "mantlet/"+p)
		}
	}
	t := report.NewTable(header...)
	for _, f := range r.Figures {
		title := f.Title
		if f.Key == "rss_held" {
			title = fmt.Sprintf("RSS with %d idle connections", r.Settings.IdleConns)
		}
		if f.Key == "rss_after" {
			title = fmt.Sprintf("RSS %s after they closed", r.Settings.Settle)
		}
		if f.Side != "" {
			title += ", " + f.Side + " side"
		}
		row := []string{title}
		for _, p := range paths {
			st, ok := f.Values[p]
			if !ok {
				row = append(row, "-")
				continue
			}
			row = append(row, formatStat(st, f.Unit))
		}
		for _, o := range others {
			st, ok := r.ratio(f.Key, f.Side, Mantlet, o)
			if !ok {
				row = append(row, "-")
				continue
			}
			row = append(row, formatRatio(st))
		}
		t.Add(row...)
	}
	fmt.Fprintf(w, "mantlet bench: pod to pod across two nodes of a testbed, %d interleaved rounds\n", r.Settings.Rounds)
	fmt.Fprintf(w, "machine: %s; took %s\n\n", r.Machine, r.Took)
	if err := t.Write(w, "  "); err != nil {
		return err
	}
	fmt.Fprintln(w)
	for _, p := range r.Paths {
		switch {
		case p.Skipped != "":
			fmt.Fprintf(w, "  %s: skipped: %s\n", p.Name, p.Skipped)
		default:
			v := ""
			if p.Version != "" {
				v = " (" + p.Version + ")"
			}
			fmt.Fprintf(w, "  %s%s: %s; node1's ztunnel captured %d of the %d connections opened", p.Name, v, p.About, p.Captured, p.Attempted)
			if len(p.Written) > 0 && p.Received > 0 {
				fmt.Fprintf(w, "; the tunnel wrote %s (client side) and %s (server side) bytes per byte iperf3 received",
					report.Number(float64(p.Written[ClientSide])/float64(p.Received)), report.Number(float64(p.Written[ServerSide])/float64(p.Received)))
			}
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintf(w, "\n  Throughput in bits per second, GB = 10^9 bytes, MiB = 2^20 bytes. Tunnel CPU: utime+stime from /proc of the tunnel's processes on that side\n"+
		"  (mantlet: the node's agent; a peer: its processes in the pods of that node, nginx with its workers). Echo: %d round trips on one connection.\n"+
		"  New connections: %d clients for %s, each connect, 1 byte each way, close. Idle connections: spread over two server pods.\n",
		r.Settings.RoundTrips, r.Settings.ConnClients, r.Settings.ConnDuration)
	return nil
}

// formatStat prints a value with its range.
func formatStat(st Stat, unit string) string {
	if len(st.Rounds) == 1 {
		return formatValue(st.Median, unit)
	}
	return fmt.Sprintf("%s (%s–%s)", formatValue(st.Median, unit), formatBare(st.Min, unit), formatBare(st.Max, unit))
}

func formatRatio(st Stat) string {
	if len(st.Rounds) == 1 {
		return report.Number(st.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", report.Number(st.Median), report.Number(st.Min), report.Number(st.Max))
}

// scale returns the divisor and unit label a value is shown in.
func scale(v float64, unit string) (float64, string) {
	switch unit {
	case "bit/s":
		switch {
		case v >= 1e9:
			return 1e9, "Gbit/s"
		case v >= 1e6:
			return 1e6, "Mbit/s"
		}
		return 1e3, "kbit/s"
	case "s":
		switch {
		case v >= 1:
			return 1, "s"
		case v >= 1e-3:
			return 1e-3, "ms"
		}
		return 1e-6, "µs"
	case "B":
		return 1 << 20, "MiB"
	case "s/GB":
		return 1, "cpu-s/GB"
	case "1/s":
		return 1, "/s"
	}
	return 1, ""
}

func formatValue(v float64, unit string) string {
	d, u := scale(v, unit)
	s := report.Number(v / d)
	if u != "" {
		s += " " + u
	}
	return s
}

func formatBare(v float64, unit string) string {
	d, _ := scale(v, unit)
	return report.Number(v / d)
}

// write writes bench.json, table.txt and bench.png into dir and prints the
// table to w.
func (r *Results) write(dir string, w io.Writer) error {
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("peerbench: encode the results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bench.json"), append(j, '\n'), 0o644); err != nil {
		return fmt.Errorf("peerbench: %w", err)
	}
	var t bytes.Buffer
	if err := r.Table(&t); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "table.txt"), t.Bytes(), 0o644); err != nil {
		return fmt.Errorf("peerbench: %w", err)
	}
	if err := r.Chart(filepath.Join(dir, "bench.png")); err != nil {
		return err
	}
	if _, err := w.Write(t.Bytes()); err != nil {
		return err
	}
	fmt.Fprintf(w, "\n  Written: %s\n", strings.Join([]string{filepath.Join(dir, "bench.json"), filepath.Join(dir, "table.txt"), filepath.Join(dir, "bench.png")}, ", "))
	return nil
}
