package hbone_test

import (
	"context"
	"io"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// FuzzServerFrames sends the server random frame sequences from an
// authenticated client (over TLS, after the preface and SETTINGS): CONNECT
// requests, DATA, resets, window updates, SETTINGS, PING, PRIORITY,
// GOAWAY, CONTINUATION and unknown frames, with stream IDs, lengths and
// flags taken from the input, then closes the connection. Whatever it
// sends, the server must not panic, and once the connection is closed
// and the server stopped, no goroutine of it may be left and the heap
// must be back within 1 MiB of where it was. The seeds run in go test;
//
//	go test -run '^$' -fuzz FuzzServerFrames ./ztunnel/hbone/
//
// explores further.
func FuzzServerFrames(f *testing.F) {
	f.Add([]byte{0, 1, 0, 2, 1, 4, 0x40, 0})                       // CONNECT, DATA, END_STREAM
	f.Add([]byte{0, 1, 0, 3, 1, 0})                                // CONNECT then reset
	f.Add([]byte{0, 1, 0, 2, 1, 0xff, 0xff, 1, 4, 1, 0, 0, 0})     // DATA beyond the window, window update
	f.Add([]byte{5, 0, 0, 5, 0, 0, 4, 0, 0, 6, 0, 0})              // PING, PING, SETTINGS, PRIORITY
	f.Add([]byte{0, 3, 1, 8, 3, 0, 9, 5, 7, 0, 1, 0})              // HEADERS without END_HEADERS, CONTINUATION, unknown
	f.Add([]byte{2, 9, 0, 4, 0, 0, 0, 2, 1, 1, 0, 7, 0, 0})        // DATA on an idle stream, GOAWAY
	f.Add([]byte{0, 1, 1, 0, 1, 1, 0, 3, 0, 2, 3, 8, 0, 3, 3, 0})  // END_STREAM on CONNECT, reused ID, data after reset
	f.Add([]byte{4, 0xff, 0xff, 0, 2, 0, 0, 0, 1, 0, 2, 1, 32, 0}) // SETTINGS with a huge window, then data
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4096 {
			return
		}
		before := runtime.NumGoroutine()
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC() // and the pools' victim caches
		runtime.ReadMemStats(&ms)
		heapBefore := ms.HeapAlloc
		t.Cleanup(func() {
			// Runs after the environment's own clean-up (server closed,
			// its connections' goroutines waited for).
			deadline := time.Now().Add(10 * time.Second)
			for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := runtime.NumGoroutine(); n > before {
				buf := make([]byte, 1<<16)
				t.Fatalf("%d goroutines left of the server (%d before); %s", n-before, before, buf[:runtime.Stack(buf, true)])
			}
			runtime.GC()
			runtime.GC()
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > heapBefore+1<<20 {
				t.Fatalf("heap grew by %d bytes and stayed", ms.HeapAlloc-heapBefore)
			}
		})
		e := newRawEnv(t, hbone.Tuning{StreamWindow: 65535, ConnWindow: 65535, MaxConcurrentStreams: 4, DrainTimeout: 100 * time.Millisecond},
			func(ctx context.Context, s *hbone.Stream) {
				if s.Respond(http.StatusOK) != nil {
					return
				}
				_, _ = io.Copy(io.Discard, s)
				_ = s.CloseWrite()
			})
		rc := e.tcp(nil)
		// Read what the server sends, so that it never waits for us.
		go func() {
			for range rc.frames {
			}
		}()
		payload := make([]byte, 1<<16)
		for i := 0; i+2 < len(data); i += 3 {
			op, a, b := data[i], data[i+1], data[i+2]
			id := uint32(a%8)*2 + 1 // client streams 1..15
			flags := http2.Flags(b)
			err := rc.write(func(fr *http2.Framer) error {
				switch op % 10 {
				case 0: // CONNECT
					rc.hbuf.Reset()
					_ = rc.enc.WriteField(hpackField(":method", "CONNECT"))
					_ = rc.enc.WriteField(hpackField(":authority", rawTarget))
					return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.hbuf.Bytes(),
						EndHeaders: b&4 == 0, EndStream: b&1 != 0})
				case 1: // WINDOW_UPDATE, stream or connection
					if b&1 != 0 {
						id = 0
					}
					return fr.WriteWindowUpdate(id, uint32(a)<<8|uint32(b)|1)
				case 2: // DATA of up to 64 KiB
					n := int(b) << 8 % len(payload)
					return fr.WriteData(id, b&1 != 0, payload[:n])
				case 3: // RST_STREAM
					return fr.WriteRSTStream(id, http2.ErrCode(b%14))
				case 4: // SETTINGS
					return fr.WriteSettings(http2.Setting{ID: http2.SettingID(a%7 + 1), Val: uint32(b) << 16})
				case 5: // PING
					return fr.WritePing(b&1 != 0, [8]byte{a, b})
				case 6: // PRIORITY
					return fr.WritePriority(id, http2.PriorityParam{StreamDep: uint32(b), Weight: a})
				case 7: // GOAWAY
					return fr.WriteGoAway(uint32(a), http2.ErrCode(b%14), nil)
				case 8: // CONTINUATION
					return fr.WriteContinuation(id, b&4 != 0, []byte{0x82})
				default: // a frame of an unknown or any type, any flags
					return fr.WriteRawFrame(http2.FrameType(a), flags, id, payload[:int(b)])
				}
			})
			if err != nil {
				break // the server closed the connection
			}
		}
		rc.c.Close()
	})
}

func hpackField(name, value string) hpack.HeaderField {
	return hpack.HeaderField{Name: name, Value: value}
}
