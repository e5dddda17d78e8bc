package enforce

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCollector(t *testing.T) {
	fx := newFixture(t, Options{MaxLimiters: 2, LimiterIdle: time.Minute})
	ctx := context.Background()
	// An audited admission, three sources to the rate-limited payments
	// (one bucket evicted at the cap of 2).
	v := fx.az.Authorize(ctx, fx.flow(ipCheck, "shop", "checkout", ipPay, 8443))
	fx.az.Release(fx.flow(ipCheck, "shop", "checkout", ipPay, 8443), v)
	for _, ip := range []string{"127.0.9.1", "127.0.9.2"} {
		f := fx.flow(netip.MustParseAddr(ip), "", "", ipPay, 8443)
		if v := fx.az.Authorize(ctx, f); v.Allow {
			fx.az.Release(f, v)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(fx.az))
	want := `
# HELP mantlet_policy_audit_hits_total AUDIT policies that matched a connection (what a DENY written like them would have refused).
# TYPE mantlet_policy_audit_hits_total counter
mantlet_policy_audit_hits_total 1
# HELP mantlet_policy_ratelimit_buckets Rate-limit token buckets held (one per destination workload and source identity or plaintext source IP).
# TYPE mantlet_policy_ratelimit_buckets gauge
mantlet_policy_ratelimit_buckets 2
# HELP mantlet_policy_ratelimit_buckets_evicted_total Rate-limit buckets dropped because they were idle or the least recently used beyond the cap.
# TYPE mantlet_policy_ratelimit_buckets_evicted_total counter
mantlet_policy_ratelimit_buckets_evicted_total 1
# HELP mantlet_policy_reevaluated_flows_total Open connections decided again after a policy or workload change, by result (kept, closed).
# TYPE mantlet_policy_reevaluated_flows_total counter
mantlet_policy_reevaluated_flows_total{result="closed"} 0
mantlet_policy_reevaluated_flows_total{result="kept"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}
