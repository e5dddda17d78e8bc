package node

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mantlet/mantlet/ztunnel"
)

func TestAdmissionCollectorExportsTheAcceptPath(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newAdmissionCollector(func() ztunnel.AdmissionStats {
		return ztunnel.AdmissionStats{PendingHandshakes: 70, PendingSources: 3, InboundPlaintext: 2, Outbound: 9,
			Descriptors: 160, DescriptorBudget: 1800, DescriptorReserve: 450}
	}))
	want := `# HELP mantlet_ztunnel_descriptors_budget File descriptors the ztunnel's connections may use: the open-file limit minus what the agent keeps.
# TYPE mantlet_ztunnel_descriptors_budget gauge
mantlet_ztunnel_descriptors_budget 1800
# HELP mantlet_ztunnel_descriptors_in_use File descriptors the ztunnel's connections use, estimated from above.
# TYPE mantlet_ztunnel_descriptors_in_use gauge
mantlet_ztunnel_descriptors_in_use 160
# HELP mantlet_ztunnel_descriptors_reserved Of the budget, the descriptors only outbound capture and established tunnels may use.
# TYPE mantlet_ztunnel_descriptors_reserved gauge
mantlet_ztunnel_descriptors_reserved 450
# HELP mantlet_ztunnel_inbound_plaintext_connections Open inbound plaintext connections (:15006).
# TYPE mantlet_ztunnel_inbound_plaintext_connections gauge
mantlet_ztunnel_inbound_plaintext_connections 2
# HELP mantlet_ztunnel_outbound_connections Open outbound connections (:15001).
# TYPE mantlet_ztunnel_outbound_connections gauge
mantlet_ztunnel_outbound_connections 9
# HELP mantlet_ztunnel_pending_handshake_sources Source IPs (IPv6: /64s) of the pending HBONE handshakes.
# TYPE mantlet_ztunnel_pending_handshake_sources gauge
mantlet_ztunnel_pending_handshake_sources 3
# HELP mantlet_ztunnel_pending_handshakes HBONE connections accepted whose TLS handshake has not ended.
# TYPE mantlet_ztunnel_pending_handshakes gauge
mantlet_ztunnel_pending_handshakes 70
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

// TestDescriptorBudgetIsTheLimitMinusWhatTheAgentHolds computes the
// budget of this test process: its open-file limit, raised to the hard
// limit, minus what it has open and what the agent keeps.
func TestDescriptorBudgetIsTheLimitMinusWhatTheAgentHolds(t *testing.T) {
	var buf bytes.Buffer
	f := &LimitsConfig{MaxPending: 10, MaxPendingPerIP: 2, MaxPlainPerIP: 3, RefusalLogRate: 1}
	lim, err := f.ztunnelLimits(slog.New(slog.NewTextHandler(&buf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	soft, hard, _ := raiseFileLimit()
	open, _ := openDescriptors()
	if soft != hard {
		t.Errorf("open-file limit %d, hard %d: not raised", soft, hard)
	}
	// Descriptors opened or closed meanwhile by other goroutines make
	// the two counts differ by a few.
	if d := soft - open - agentDescriptors - lim.Descriptors; d < -8 || d > 8 {
		t.Errorf("budget %d, want about %d - %d open - %d", lim.Descriptors, soft, open, agentDescriptors)
	}
	if lim.MaxPendingHandshakes != 10 || lim.MaxPendingPerIP != 2 || lim.MaxInboundPlaintextPerIP != 3 || lim.RefusalLogRate != 1 {
		t.Errorf("limits %+v do not carry the flags", lim)
	}
	if !strings.Contains(buf.String(), "descriptor budget of the ztunnel's connections") {
		t.Errorf("no start-up line about the budget: %s", buf.String())
	}
	f.FDReserve = lim.Descriptors + 1000
	if _, err := f.ztunnelLimits(slog.New(slog.DiscardHandler)); err == nil || !strings.HasPrefix(err.Error(), "descriptor reserve ") {
		t.Errorf("a reserve above the budget: err %v", err)
	}
}
