package peerbench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"
	"strings"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"

	"github.com/mantlet/mantlet/internal/report"
)

// The chart is drawn with the standard library's image packages and a
// fixed bitmap font, not with a plotting library: every mantlet process
// (the agent too) runs the init of every package linked in, and a
// plotting library's parses its TrueType fonts there, which kept about
// 3 MiB of them resident in every agent (docs/performance.md, "Idle
// memory").

// chartColumns is how many panels a row of the chart holds.
const chartColumns = 4

// The panel's geometry, in pixels.
const (
	panelW     = 360
	panelH     = 250
	plotLeft   = 52  // room for the scale's labels
	plotRight  = 12  // room after the last bar
	plotTop    = 60  // room for the title (two lines) and the unit
	plotBottom = 22  // room for the paths' names
	lineHeight = 14  // of basicfont.Face7x13
	charWidth  = 7   // of basicfont.Face7x13
	gridLines  = 4   // horizontal lines of the scale, 0 not counted
	barShare   = 0.6 // of a path's slot that its bars take
)

// Colours of the bars: one per side of a tunnel, one for whole-path
// figures; and of the rest of the drawing.
var (
	pathColor   = color.RGBA{R: 0x4c, G: 0x72, B: 0xb0, A: 0xff}
	clientColor = color.RGBA{R: 0x55, G: 0xa8, B: 0x68, A: 0xff}
	serverColor = color.RGBA{R: 0xdd, G: 0x84, B: 0x52, A: 0xff}
	inkColor    = color.RGBA{R: 0x22, G: 0x22, B: 0x22, A: 0xff}
	gridColor   = color.RGBA{R: 0xdd, G: 0xdd, B: 0xdd, A: 0xff}
	rangeColor  = color.RGBA{R: 0x33, G: 0x33, B: 0x33, A: 0xff}
)

// sideColor is the colour of the bars of side ("" for the whole path).
func sideColor(side string) color.RGBA {
	switch side {
	case ClientSide:
		return clientColor
	case ServerSide:
		return serverColor
	}
	return pathColor
}

// chartPanel is one figure: its per-side parts come in pairs (client,
// server).
type chartPanel struct {
	title, unit string
	sides       []Figure
}

// Chart draws one bar panel per figure (medians, with the range of the
// rounds as a line over each bar; per-side figures as a client and a
// server bar per path) into a PNG file.
func (r *Results) Chart(file string) error {
	var panels []chartPanel
	index := map[string]int{}
	for _, f := range r.Figures {
		if i, ok := index[f.Key]; ok {
			panels[i].sides = append(panels[i].sides, f)
			continue
		}
		index[f.Key] = len(panels)
		panels = append(panels, chartPanel{title: f.Title, unit: f.Unit, sides: []Figure{f}})
	}
	if len(panels) == 0 {
		return nil
	}
	rows := (len(panels) + chartColumns - 1) / chartColumns
	img := image.NewRGBA(image.Rect(0, 0, panelW*chartColumns, panelH*rows))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	paths := r.measured()
	for i, pn := range panels {
		origin := image.Pt(i%chartColumns*panelW, i/chartColumns*panelH)
		drawPanel(img, origin, pn, paths, r.Settings.Rounds > 1)
	}
	f, err := os.Create(file)
	if err != nil {
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	return nil
}

// drawPanel draws pn into the panel whose top left corner is at o: bars
// for the paths (of paths, in order) that have a value, on a scale from
// 0 to a little over the largest range.
func drawPanel(img *image.RGBA, o image.Point, pn chartPanel, paths []string, ranges bool) {
	var names []string
	top := 0.0
	for _, n := range paths {
		has := false
		for _, f := range pn.sides {
			if st, ok := f.Values[n]; ok {
				has = true
				top = max(top, st.Median, st.Max)
			}
		}
		if has {
			names = append(names, n)
		}
	}
	div, unit := scale(top, pn.unit)
	for k, line := range wrap(pn.title, (panelW-8)/charWidth, 2) {
		text(img, o.X+4, o.Y+lineHeight*(k+1), line, inkColor)
	}
	text(img, o.X+4, o.Y+plotTop-14, unit, rangeColor)
	plot := image.Rect(o.X+plotLeft, o.Y+plotTop, o.X+panelW-plotRight, o.Y+panelH-plotBottom)
	if top <= 0 || len(names) == 0 {
		text(img, plot.Min.X, plot.Min.Y+lineHeight, "no values", rangeColor)
		return
	}
	// The scale: gridLines steps of a round size that reach past top.
	step := roundStep(top / div / gridLines)
	ymax := step * gridLines
	for ymax < top/div {
		ymax += step
	}
	y := func(v float64) int { return plot.Max.Y - int(v/div/ymax*float64(plot.Dy())+0.5) }
	for k := 0; float64(k)*step <= ymax+step/1e6; k++ {
		v := float64(k) * step
		py := plot.Max.Y - int(v/ymax*float64(plot.Dy())+0.5)
		fill(img, image.Rect(plot.Min.X, py, plot.Max.X, py+1), gridColor)
		label := report.Number(v)
		text(img, plot.Min.X-4-len(label)*charWidth, py+4, label, rangeColor)
	}
	slot := plot.Dx() / len(names)
	barW := max(2, int(float64(slot)*barShare)/len(pn.sides))
	for x, n := range names {
		left := plot.Min.X + x*slot + (slot-barW*len(pn.sides))/2
		for k, f := range pn.sides {
			st, ok := f.Values[n]
			if !ok {
				continue
			}
			bar := image.Rect(left+k*barW, y(st.Median), left+(k+1)*barW-1, plot.Max.Y)
			fill(img, bar, sideColor(f.Side))
			if ranges && st.Max > st.Min {
				mid := (bar.Min.X + bar.Max.X) / 2
				fill(img, image.Rect(mid, y(st.Max), mid+1, y(st.Min)+1), rangeColor)
				fill(img, image.Rect(mid-3, y(st.Max), mid+4, y(st.Max)+1), rangeColor)
				fill(img, image.Rect(mid-3, y(st.Min), mid+4, y(st.Min)+1), rangeColor)
			}
		}
		name := n
		if w := slot / charWidth; len(name) > w && w > 1 {
			name = name[:w-1] + "."
		}
		text(img, plot.Min.X+x*slot+(slot-len(name)*charWidth)/2, plot.Max.Y+lineHeight+2, name, inkColor)
	}
	fill(img, image.Rect(plot.Min.X, plot.Max.Y, plot.Max.X, plot.Max.Y+1), inkColor)
	// The legend, when the bars are sides.
	lx := plot.Max.X
	for k := len(pn.sides) - 1; k >= 0; k-- {
		side := pn.sides[k].Side
		if side == "" {
			continue
		}
		lx -= len(side)*charWidth + 16
		fill(img, image.Rect(lx, o.Y+plotTop-23, lx+9, o.Y+plotTop-14), sideColor(side))
		text(img, lx+12, o.Y+plotTop-14, side, inkColor)
	}
}

// roundStep returns the smallest of 1, 2 or 5 times a power of ten that
// is at least v (v > 0).
func roundStep(v float64) float64 {
	p := 1.0
	for p*10 <= v {
		p *= 10
	}
	for p > v {
		p /= 10
	}
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

// wrap breaks s into at most n lines of at most width characters, at
// spaces; the last line is cut with "..." when s does not fit.
func wrap(s string, width, n int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(s) {
		switch {
		case line == "":
			line = w
		case len(line)+1+len(w) <= width:
			line += " " + w
		default:
			lines = append(lines, line)
			line = w
		}
	}
	lines = append(lines, line)
	if len(lines) > n {
		lines = lines[:n]
		last := lines[n-1]
		if len(last) > width-3 {
			last = last[:width-3]
		}
		lines[n-1] = last + "..."
	}
	return lines
}

// fill paints r in c.
func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	draw.Draw(img, r, image.NewUniform(c), image.Point{}, draw.Src)
}

// text writes s with its baseline at (x, y). The font has ASCII only:
// "µs" is written "us".
func text(img *image.RGBA, x, y int, s string, c color.RGBA) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(strings.ReplaceAll(s, "µ", "u"))
}
