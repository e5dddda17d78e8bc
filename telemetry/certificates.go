package telemetry

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
)

// Certificates exports the node's SVIDs, read from the identity manager at
// scrape time, and counts issuance attempts (hook it to
// identity.ManagerOptions.OnIssue):
//
//	mantlet_svid_expiry_seconds{identity}    seconds until the SVID expires (negative: expired)
//	mantlet_svid_lifetime_seconds{identity}  the SVID's validity, not-before to not-after
//	mantlet_svid_issuances_total{result}     attempts to get an SVID: ok or failed
//
// One series per identity of the node's workloads.
type Certificates struct {
	certs    func() []identity.CertInfo
	now      func() time.Time
	expiry   *prometheus.Desc
	lifetime *prometheus.Desc
	issued   *prometheus.CounterVec
}

// NewCertificates returns the certificate metrics over certs (for example
// (*identity.Manager).Certificates); now may be nil (time.Now).
func NewCertificates(certs func() []identity.CertInfo, now func() time.Time) *Certificates {
	if now == nil {
		now = time.Now
	}
	c := &Certificates{
		certs: certs, now: now,
		expiry: prometheus.NewDesc("mantlet_svid_expiry_seconds",
			"Seconds until the node's SVID of this identity expires; negative once expired.", []string{"identity"}, nil),
		lifetime: prometheus.NewDesc("mantlet_svid_lifetime_seconds",
			"Validity of the node's SVID of this identity, from not-before to not-after, in seconds (renewal is due at half of it).", []string{"identity"}, nil),
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_svid_issuances_total",
			Help: "Attempts to get an SVID from the CA (first fetches and renewals), by result: ok or failed.",
		}, []string{"result"}),
	}
	c.issued.WithLabelValues("ok")
	c.issued.WithLabelValues("failed")
	return c
}

// OnIssue counts one issuance attempt; it matches
// identity.ManagerOptions.OnIssue.
func (c *Certificates) OnIssue(_ spiffeid.ID, err error) {
	if err != nil {
		c.issued.WithLabelValues("failed").Inc()
		return
	}
	c.issued.WithLabelValues("ok").Inc()
}

// Describe implements prometheus.Collector.
func (c *Certificates) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.expiry
	ch <- c.lifetime
	c.issued.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Certificates) Collect(ch chan<- prometheus.Metric) {
	now := c.now()
	for _, ci := range c.certs() {
		if ci.NotAfter.IsZero() {
			continue // no SVID yet: nothing expires
		}
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, ci.NotAfter.Sub(now).Seconds(), ci.ID.String())
		if !ci.NotBefore.IsZero() {
			ch <- prometheus.MustNewConstMetric(c.lifetime, prometheus.GaugeValue, ci.NotAfter.Sub(ci.NotBefore).Seconds(), ci.ID.String())
		}
	}
	c.issued.Collect(ch)
}
