package clusterca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mantlet/mantlet/identity/ca"
)

// metrics are the service's Prometheus metrics:
//
//	mantlet_ca_sign_requests_total{verdict,reason}   sign requests: signed, or refused and why (Reason names)
//	mantlet_ca_sign_duration_seconds{verdict}        time to answer a sign request, token review included
//	mantlet_ca_token_reviews_total{result}           tokens checked: reviewed (asked the API server), cached, failed (the API did not answer)
//	mantlet_ca_signing_expiry_seconds                seconds until the signing certificate (intermediate or root) expires
//	mantlet_ca_roots                                 roots in the trust bundle (2 during a rotation)
//	mantlet_ca_rotation_phase{phase}                 1 for the CA's rotation phase (idle, prepared, activated)
type metrics struct {
	current  func() *ca.CA
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	reviews  *prometheus.CounterVec
	expiry   *prometheus.Desc
	roots    *prometheus.Desc
	phase    *prometheus.Desc
	now      func() time.Time
}

func newMetrics(current func() *ca.CA) *metrics {
	m := &metrics{
		current: current,
		now:     time.Now,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_ca_sign_requests_total",
			Help: "Sign requests of node agents, by verdict (signed, refused) and reason (signed, or why it was refused).",
		}, []string{"verdict", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "mantlet_ca_sign_duration_seconds",
			Help:    "Time to answer a sign request, the token review included, by verdict.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"verdict"}),
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mantlet_ca_token_reviews_total",
			Help: "Agent tokens checked, by result: reviewed (asked the API server), cached (an earlier review still holds), failed (the API server did not answer).",
		}, []string{"result"}),
		expiry: prometheus.NewDesc("mantlet_ca_signing_expiry_seconds",
			"Seconds until the CA's signing certificate (the intermediate, or the root) expires.", nil, nil),
		roots: prometheus.NewDesc("mantlet_ca_roots",
			"Root certificates in the trust bundle (more than one during a root rotation).", nil, nil),
		phase: prometheus.NewDesc("mantlet_ca_rotation_phase",
			"1 for the CA's root rotation phase: idle, prepared or activated.", []string{"phase"}, nil),
	}
	for r := range numReasons {
		m.requests.WithLabelValues(verdict(r), r.String())
	}
	m.duration.WithLabelValues("signed")
	m.duration.WithLabelValues("refused")
	for _, r := range []string{"reviewed", "cached", "failed"} {
		m.reviews.WithLabelValues(r)
	}
	return m
}

func verdict(r Reason) string {
	if r == ReasonNone {
		return "signed"
	}
	return "refused"
}

func (m *metrics) observe(r Reason, d time.Duration) {
	m.requests.WithLabelValues(verdict(r), r.String()).Inc()
	m.duration.WithLabelValues(verdict(r)).Observe(d.Seconds())
}

// reviewed counts one token check: r is its outcome.
func (m *metrics) reviewed(r Reason, cached bool) {
	switch {
	case cached:
		m.reviews.WithLabelValues("cached").Inc()
	case r == ReasonUnavailable:
		m.reviews.WithLabelValues("failed").Inc()
	default:
		m.reviews.WithLabelValues("reviewed").Inc()
	}
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.requests.Describe(ch)
	m.duration.Describe(ch)
	m.reviews.Describe(ch)
	ch <- m.expiry
	ch <- m.roots
	ch <- m.phase
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.requests.Collect(ch)
	m.duration.Collect(ch)
	m.reviews.Collect(ch)
	c := m.current()
	ch <- prometheus.MustNewConstMetric(m.expiry, prometheus.GaugeValue, c.SigningExpiry().Sub(m.now()).Seconds())
	ch <- prometheus.MustNewConstMetric(m.roots, prometheus.GaugeValue, float64(len(c.Roots())))
	for _, p := range []ca.Phase{ca.PhaseIdle, ca.PhasePrepared, ca.PhaseActivated} {
		v := 0.0
		if c.Phase() == p {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(m.phase, prometheus.GaugeValue, v, p.String())
	}
}

// Collector returns the service's metrics.
func (s *Server) Collector() prometheus.Collector { return s.metrics }

// Metrics returns a collector of the service's metric families, nothing
// counted, over the CA current returns: for tools that list or check the
// families (alert rules, dashboards) without running a service.
func Metrics(current func() *ca.CA) prometheus.Collector { return newMetrics(current) }
