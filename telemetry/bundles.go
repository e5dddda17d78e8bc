package telemetry

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/identity"
)

// Bundles exports the trust bundles a node verifies peers with, read at
// scrape time (for example from identity.Manager.Bundles and
// identity.Federation.Bundles):
//
//	mantlet_trust_bundle_authorities{trust_domain,federated}      root certificates in the bundle
//	mantlet_trust_bundle_read_failures{trust_domain,federated}    consecutive failed reads (the last good bundle stays in use)
//	mantlet_trust_bundle_reloads_total{trust_domain,federated}    changes read from a federated bundle's file after the first
//
// federated is "true" for a foreign trust domain's bundle, "false" for
// the node's own. Connections refused because the peer's trust domain
// has no bundle are counted by the flows' response_flags
// (tls_untrusted_domain).
type Bundles struct {
	bundles     func() []identity.BundleInfo
	authorities *prometheus.Desc
	failures    *prometheus.Desc
	reloads     *prometheus.Desc
}

// NewBundles returns the trust bundle metrics over bundles.
func NewBundles(bundles func() []identity.BundleInfo) *Bundles {
	labels := []string{"trust_domain", "federated"}
	return &Bundles{
		bundles: bundles,
		authorities: prometheus.NewDesc("mantlet_trust_bundle_authorities",
			"Root certificates in the trust bundle of this trust domain.", labels, nil),
		failures: prometheus.NewDesc("mantlet_trust_bundle_read_failures",
			"Consecutive failed reads of the trust bundle of this trust domain; the last good bundle stays in use meanwhile.", labels, nil),
		reloads: prometheus.NewDesc("mantlet_trust_bundle_reloads_total",
			"Changes read from a federated trust bundle's file after the first read.", labels, nil),
	}
}

// Describe implements prometheus.Collector.
func (b *Bundles) Describe(ch chan<- *prometheus.Desc) {
	ch <- b.authorities
	ch <- b.failures
	ch <- b.reloads
}

// Collect implements prometheus.Collector.
func (b *Bundles) Collect(ch chan<- prometheus.Metric) {
	for _, bi := range b.bundles() {
		fed := "false"
		if bi.Federated {
			fed = "true"
		}
		td := bi.TrustDomain.Name()
		ch <- prometheus.MustNewConstMetric(b.authorities, prometheus.GaugeValue, float64(len(bi.Roots)), td, fed)
		ch <- prometheus.MustNewConstMetric(b.failures, prometheus.GaugeValue, float64(bi.Failures), td, fed)
		if bi.Federated {
			ch <- prometheus.MustNewConstMetric(b.reloads, prometheus.CounterValue, float64(bi.Reloads), td, fed)
		}
	}
}
