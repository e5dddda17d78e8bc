package peerbench

import (
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// chartColumns is how many panels a row of the chart holds.
const chartColumns = 4

// Colours of the bars: one per side of a tunnel, one for whole-path
// figures.
var (
	pathColor   = color.RGBA{R: 0x4c, G: 0x72, B: 0xb0, A: 0xff}
	clientColor = color.RGBA{R: 0x55, G: 0xa8, B: 0x68, A: 0xff}
	serverColor = color.RGBA{R: 0xdd, G: 0x84, B: 0x52, A: 0xff}
)

// errPoints are bar tops with their ranges, for YErrorBars.
type errPoints []struct{ x, y, lo, hi float64 }

func (e errPoints) Len() int                        { return len(e) }
func (e errPoints) XY(i int) (float64, float64)     { return e[i].x, e[i].y }
func (e errPoints) YError(i int) (float64, float64) { return e[i].y - e[i].lo, e[i].hi - e[i].y }

// Chart draws one bar panel per figure (medians, with the range of the
// rounds as error bars; per-side figures as a client and a server bar per
// path) into a PNG file.
func (r *Results) Chart(file string) error {
	paths := r.measured()
	// Per-side figures come in pairs (client, server): one panel each.
	type panel struct {
		title, unit string
		sides       []Figure
	}
	var panels []panel
	index := map[string]int{}
	for _, f := range r.Figures {
		if i, ok := index[f.Key]; ok {
			panels[i].sides = append(panels[i].sides, f)
			continue
		}
		index[f.Key] = len(panels)
		panels = append(panels, panel{title: f.Title, unit: f.Unit, sides: []Figure{f}})
	}
	if len(panels) == 0 {
		return nil
	}
	rows := (len(panels) + chartColumns - 1) / chartColumns
	grid := make([][]*plot.Plot, rows)
	for i := range grid {
		grid[i] = make([]*plot.Plot, chartColumns)
	}
	const barWidth = 14
	for i, pn := range panels {
		p := plot.New()
		p.Title.Text = pn.title
		p.Title.TextStyle.Font.Size = vg.Points(9)
		// The panel's scale is the one of its largest median.
		top := 0.0
		for _, f := range pn.sides {
			for _, st := range f.Values {
				top = max(top, st.Median)
			}
		}
		div, label := scale(top, pn.unit)
		p.Y.Label.Text = label
		p.Y.Min = 0
		var names []string
		for _, n := range paths {
			for _, f := range pn.sides {
				if _, ok := f.Values[n]; ok {
					names = append(names, n)
					break
				}
			}
		}
		for k, f := range pn.sides {
			var vals plotter.Values
			var errs errPoints
			// Sides sit left and right of their path's tick.
			shift := 0.0
			if f.Side != "" {
				shift = 0.4 * (float64(k) - float64(len(pn.sides)-1)/2)
			}
			for x, n := range names {
				st := f.Values[n] // zero when this side has none
				vals = append(vals, st.Median/div)
				errs = append(errs, struct{ x, y, lo, hi float64 }{float64(x) + shift, st.Median / div, st.Min / div, st.Max / div})
			}
			bars, err := plotter.NewBarChart(vals, vg.Points(barWidth))
			if err != nil {
				return fmt.Errorf("peerbench: chart %s: %w", f.Key, err)
			}
			bars.LineStyle.Width = 0
			bars.Color = pathColor
			if f.Side != "" {
				bars.Color = clientColor
				if f.Side == ServerSide {
					bars.Color = serverColor
				}
				bars.XMin = shift
				p.Legend.Add(f.Side+" side", bars)
			}
			p.Add(bars)
			if r.Settings.Rounds > 1 {
				eb, err := plotter.NewYErrorBars(errs)
				if err != nil {
					return fmt.Errorf("peerbench: chart %s: %w", f.Key, err)
				}
				p.Add(eb)
			}
		}
		p.Legend.Top = true
		p.Legend.TextStyle.Font.Size = vg.Points(7)
		p.NominalX(names...)
		grid[i/chartColumns][i%chartColumns] = p
	}
	for i := len(panels); i < rows*chartColumns; i++ {
		grid[i/chartColumns][i%chartColumns] = plot.New()
		grid[i/chartColumns][i%chartColumns].HideAxes()
	}
	img := vgimg.New(vg.Points(300*chartColumns), vg.Points(230*float64(rows)))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: rows, Cols: chartColumns, PadX: vg.Points(12), PadY: vg.Points(12),
		PadTop: vg.Points(8), PadBottom: vg.Points(8), PadLeft: vg.Points(8), PadRight: vg.Points(8)}
	canvases := plot.Align(grid, tiles, dc)
	for j := range rows {
		for i := range chartColumns {
			grid[j][i].Draw(canvases[j][i])
		}
	}
	f, err := os.Create(file)
	if err != nil {
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("peerbench: chart: %w", err)
	}
	return nil
}
