package hbone_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mantlet/mantlet/ztunnel/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

func TestConnectionsEndWithTheirCertificatesOrAge(t *testing.T) {
	// A client keeps its connection busy past the end of its life: from
	// then on the server refuses new streams (GOAWAY NO_ERROR, then
	// REFUSED_STREAM), lets the open one finish within DrainTimeout, and
	// closes the connection.
	for _, tc := range []struct {
		name string
		age  time.Duration
		// short makes the client's or the server's certificate live 2 s.
		shortClient, shortServer bool
	}{
		{name: "client certificate expires", shortClient: true},
		{name: "server certificate expires", shortServer: true},
		{name: "maximum connection age", age: 1500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var started atomic.Int32
			tune := hbone.Tuning{MaxConnectionAge: tc.age, DrainTimeout: 500 * time.Millisecond}
			e := newRawEnv(t, tune, func(ctx context.Context, s *hbone.Stream) {
				started.Add(1)
				s.Respond(http.StatusOK)
				<-ctx.Done()
			})
			var svid *x509svid.SVID
			end := time.Now().Add(tc.age)
			if tc.shortClient {
				svid = mustMintT(t, e, e.client, 2*time.Second)
				end = svid.Certificates[0].NotAfter
			}
			if tc.shortServer {
				s := mustMintT(t, e, e.server, 2*time.Second)
				e.ca.Set(e.server, s)
				end = s.Certificates[0].NotAfter
			}
			rc := e.tcp(svid)
			if err := rc.connect(1, false); err != nil {
				t.Fatal(err)
			}
			if st, err := rc.status(1); err != nil || st != "200" {
				t.Fatalf("stream 1: %q, %v; want 200", st, err)
			}
			g, err := rc.readUntil("GOAWAY", func(s frameSummary) bool { return s.typ == http2.FrameGoAway })
			if err != nil {
				t.Fatal(err)
			}
			if now := time.Now(); g.code != http2.ErrCodeNo || g.id != 1 || now.Before(end) {
				t.Fatalf("GOAWAY %v (last stream %d) at %v, want NO_ERROR (last stream 1) at or after %v",
					g.code, g.id, now.Format(time.RFC3339Nano), end.Format(time.RFC3339Nano))
			}
			if err := rc.connect(3, false); err != nil {
				t.Fatal(err)
			}
			if st, err := rc.status(3); err != nil || st != "RST_STREAM REFUSED_STREAM" {
				t.Fatalf("stream after the end of life: %q, %v; want RST_STREAM REFUSED_STREAM", st, err)
			}
			if _, err := rc.waitClosed(); err != nil {
				t.Fatalf("the drained connection: %v", err)
			}
			if n := started.Load(); n != 1 {
				t.Fatalf("%d handlers started, want 1", n)
			}
		})
	}
}

func mustMintT(t *testing.T, e *rawEnv, id spiffeid.ID, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	s, err := e.ca.Mint(id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// rotatingSVIDs hands out an SVID of ttl and replaces it at half its life,
// as the identity manager does.
type rotatingSVIDs struct {
	e      *env
	ttl    time.Duration
	mu     sync.Mutex
	cur    *x509svid.SVID
	minted int
}

func (r *rotatingSVIDs) SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur == nil || time.Now().After(r.cur.Certificates[0].NotAfter.Add(-r.ttl/2)) {
		s, err := r.e.ca.Mint(id, r.ttl)
		if err != nil {
			return nil, err
		}
		r.cur = s
		r.minted++
	}
	return r.cur, nil
}

func TestPoolRotatesConnectionsBeforeTheirCertificatesExpire(t *testing.T) {
	// Client certificates live 8 s and rotate at half their life; four
	// clients open tunnels without pause for 18 s. The pool retires each
	// connection ahead of its certificate's expiry and dials a new one with
	// the current certificate: no tunnel fails, while the server refuses
	// every stream past a certificate's expiry.
	if testing.Short() {
		t.Skip("runs 18 s")
	}
	const ttl, run = 8 * time.Second, 18 * time.Second
	e := newEnv(t, hbone.Tuning{DrainTimeout: 5 * time.Second}, nil)
	svids := &rotatingSVIDs{e: e, ttl: ttl}
	pool := hbone.NewPool(hbone.PoolConfig{SVID: svids.SVID, Bundles: e.ca.Bundles()})
	t.Cleanup(pool.Close)
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(run)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := make([]byte, 1024)
			rand.Read(msg)
			for time.Now().Before(stop) {
				cs, err := pool.Connect(t.Context(), e.req(bytes.NewReader(msg)))
				if err == nil {
					var got []byte
					got, err = io.ReadAll(cs)
					cs.Close()
					if err == nil && !bytes.Equal(got, msg) {
						err = io.ErrUnexpectedEOF
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	st := pool.Stats()
	svids.mu.Lock()
	minted := svids.minted
	svids.mu.Unlock()
	t.Logf("%d tunnels, %d failed, %d handshakes, %d certificates", ok.Load(), failed.Load(), st.Handshakes, minted)
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d tunnels failed across certificate rotations, first: %v", n, n+ok.Load(), firstErr.Load())
	}
	if st.Handshakes < 3 || minted < 3 {
		t.Fatalf("%d handshakes with %d certificates in %v of %v certificates, want at least 3 of each", st.Handshakes, minted, run, ttl)
	}
	if errs := e.refusedErrs(); len(errs) > 0 {
		t.Fatalf("server refused %v", errs)
	}
}

// refusedErrs returns what the server's Refused received.
func (e *env) refusedErrs() []error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]error(nil), e.refused...)
}
