package peerbench

import (
	"image"
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

// TestChartDrawsABarPerPathAndSideToScale: a reader compares bars by
// their heights, so a median twice another's is a bar twice as tall, and
// each side of a tunnel has its colour.
func TestChartDrawsABarPerPathAndSideToScale(t *testing.T) {
	r := &Results{
		Settings: Settings{Rounds: 3},
		Paths:    []PathResult{{Name: Direct}, {Name: Mantlet}, {Name: "ghostunnel"}, {Name: "nginx", Skipped: "not installed"}},
		Figures: []Figure{
			{Key: "throughput_1", Title: "throughput, 1 stream", Unit: "bit/s", Values: map[string]Stat{
				Direct: {Median: 30e9, Min: 29e9, Max: 31e9}, Mantlet: {Median: 6e9, Min: 5e9, Max: 7e9}, "ghostunnel": {Median: 3e9, Min: 3e9, Max: 3e9}}},
			{Key: "cpu", Title: "tunnel CPU per GB", Unit: "s/GB", Side: ClientSide, Values: map[string]Stat{
				Mantlet: {Median: 1}, "ghostunnel": {Median: 2}}},
			{Key: "cpu", Title: "tunnel CPU per GB", Unit: "s/GB", Side: ServerSide, Values: map[string]Stat{
				Mantlet: {Median: 0.5}, "ghostunnel": {Median: 2}}},
		},
	}
	file := filepath.Join(t.TempDir(), "bench.png")
	if err := r.Chart(file); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("bench.png: %v", err)
	}
	if got, want := img.Bounds().Size(), image.Pt(panelW*chartColumns, panelH); got != want {
		t.Fatalf("chart of 2 figures is %v pixels, want one row of %d panels: %v", got, chartColumns, want)
	}
	// Bars, left to right in each panel, as (colour, height).
	type bar struct {
		c      string
		height int
	}
	bars := func(panel int) []bar {
		var out []bar
		base := panelH - plotBottom - 1 // the lowest row of the plot
		last := ""
		for x := panel * panelW; x < (panel+1)*panelW; x++ {
			name := colourName(img.At(x, base))
			if name == "" || name == last {
				last = name
				continue
			}
			last = name
			h := 0
			for y := base; y >= 0 && colourName(img.At(x, y)) == name; y-- {
				h++
			}
			out = append(out, bar{name, h})
		}
		return out
	}
	p1 := bars(0)
	if len(p1) != 3 || p1[0].c != "path" || p1[1].c != "path" || p1[2].c != "path" {
		t.Fatalf("throughput panel: bars %v, want 3 of the path's colour (nginx was skipped)", p1)
	}
	if r := float64(p1[1].height) / float64(p1[2].height); r < 1.9 || r > 2.1 {
		t.Errorf("throughput panel: mantlet's bar (6 Gbit/s) is %.2f times ghostunnel's (3 Gbit/s), want 2 (bars %v)", r, p1)
	}
	if r := float64(p1[0].height) / float64(p1[2].height); r < 9.5 || r > 10.5 {
		t.Errorf("throughput panel: direct's bar (30 Gbit/s) is %.2f times ghostunnel's, want 10 (bars %v)", r, p1)
	}
	p2 := bars(1)
	want := []string{"client", "server", "client", "server"}
	if len(p2) != len(want) {
		t.Fatalf("CPU panel: bars %v, want a client and a server bar for mantlet and ghostunnel", p2)
	}
	for i, b := range p2 {
		if b.c != want[i] {
			t.Fatalf("CPU panel: bar %d is %s, want %s (bars %v)", i, b.c, want[i], p2)
		}
	}
	if r := float64(p2[0].height) / float64(p2[1].height); r < 1.9 || r > 2.1 {
		t.Errorf("CPU panel: mantlet's client bar (1) is %.2f times its server bar (0.5), want 2 (bars %v)", r, p2)
	}
}

// colourName names the bar colours; "" for anything else.
func colourName(c interface{ RGBA() (r, g, b, a uint32) }) string {
	for name, bc := range map[string]interface{ RGBA() (r, g, b, a uint32) }{"path": pathColor, "client": clientColor, "server": serverColor} {
		r1, g1, b1, _ := c.RGBA()
		r2, g2, b2, _ := bc.RGBA()
		if r1 == r2 && g1 == g2 && b1 == b2 {
			return name
		}
	}
	return ""
}

// TestWrapKeepsTitlesInsideTheirPanel: long titles break at spaces and
// never run past their width or their line count.
func TestWrapKeepsTitlesInsideTheirPanel(t *testing.T) {
	got := wrap("RSS after they closed and the settle time, per side of the tunnel", 20, 2)
	if len(got) != 2 || got[0] != "RSS after they" || got[1] != "closed and the..." {
		t.Errorf("wrap = %q", got)
	}
	if got := wrap("short", 20, 2); len(got) != 1 || got[0] != "short" {
		t.Errorf("wrap(short) = %q", got)
	}
}
