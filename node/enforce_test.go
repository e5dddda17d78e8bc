package node

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/policy/v1alpha1"
	"github.com/mantlet/mantlet/ztunnel"
)

// eventLines collects the security event output.
type eventLines struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *eventLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *eventLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestAbusiveHBONEClientsBecomeSecurityEvents(t *testing.T) {
	out := &eventLines{}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	en, err := newEnforcement(&PolicyConfig{SecurityEvents: "-", EventsRate: 1000, Stderr: out}, "node2", td,
		v1alpha1.MTLSPermissive, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		en.ev.Run(ctx)
	}()
	defer func() {
		cancel()
		<-done
		en.close()
	}()
	var cfg ztunnel.Config
	en.ztunnelHooks(&cfg)
	attacker := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/attacker")
	src, dst := netip.MustParseAddrPort("198.19.1.13:40000"), netip.MustParseAddrPort("198.19.2.11:15008")
	cfg.OnReject(&ztunnel.Rejection{Time: time.Now(), Flag: ztunnel.FlagStreamLimit, Err: errors.New("limit"), Src: src, Dst: dst, SrcID: attacker})
	cfg.OnReject(&ztunnel.Rejection{Time: time.Now(), Flag: ztunnel.FlagRapidReset, Err: errors.New("rapid"), Src: src, Dst: dst, SrcID: attacker})
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "\n") {
		if time.Now().After(deadline) {
			t.Fatal("no security event written")
		}
		time.Sleep(5 * time.Millisecond)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("events:\n%s\nwant one (the rapid reset; a stream limit is no event)", out)
	}
	for _, want := range []string{`"kind":"security_event"`, `"event":"deny"`, `"stage":"protocol"`, `"verdict":"denied"`,
		`"reason":"rapid-reset"`, `"response_flag":"rapid_reset"`, `"node":"node2"`,
		`"identity":"spiffe://cluster.local/ns/shop/sa/attacker"`, `"addr":"198.19.1.13:40000"`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("event %s lacks %s", lines[0], want)
		}
	}
}
