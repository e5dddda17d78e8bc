//go:build linux

package ztunnel_test

import (
	"bytes"
	"sync"
	"testing"

	"github.com/mantlet/mantlet/ztunnel"
	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func TestRapidResetIsCountedAndReported(t *testing.T) {
	const burst = 10
	var mu sync.Mutex
	var rejections []*ztunnel.Rejection
	m := newMesh(t, meshOpts{tuning: ztunnel.Config{
		Tuning: hbone.Tuning{ResetBurst: burst, ResetRate: 1e-3},
		OnReject: func(r *ztunnel.Rejection) {
			mu.Lock()
			rejections = append(rejections, r)
			mu.Unlock()
		},
	}})
	b := m.nodes["node-b"]
	before := b.p.Rejected(ztunnel.FlagRapidReset)
	fr, _ := rawH2(t, m)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: m.appAddr(ipB1).String()})
	block := buf.Bytes() // sent again for every stream: its literals decode the same each time
	id := uint32(1)
	openAndReset := func() {
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
		id += 2
	}
	for range burst + 1 {
		openAndReset()
	}
	// Only resets of streams the server had not answered count: one answered
	// before our reset arrived is made up for.
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("no GOAWAY after %d streams opened and reset: %v", (id-1)/2, err)
		}
		if _, ok := f.(*http2.MetaHeadersFrame); ok {
			openAndReset()
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			if g.ErrCode != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", g.ErrCode)
			}
			break
		}
	}
	b.waitCount(t, ztunnel.FlagRapidReset, before+1)
	mu.Lock()
	defer mu.Unlock()
	var found bool
	for _, r := range rejections {
		if r.Flag == ztunnel.FlagRapidReset && r.SrcID == m.id("frontend") && r.Dst.Addr() == ipB1 {
			found = true
		}
	}
	if !found {
		t.Fatalf("OnReject got %+v, want a rapid_reset of frontend to %s", rejections, ipB1)
	}
}
