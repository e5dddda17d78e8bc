package scenario

import (
	"testing"

	"github.com/mantlet/mantlet/internal/meshtest"
)

func TestIstioOpenedFindsTheMeshedConnectionOfAReporter(t *testing.T) {
	const (
		client = "spiffe://cluster.local/ns/shop/sa/client"
		server = "spiffe://cluster.local/ns/shop/sa/server"
	)
	ms, err := meshtest.ParseMetrics(`# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_principal="` + client + `",response_flags="-"} 3
istio_tcp_connections_opened_total{reporter="source",source_principal="` + client + `",destination_principal="` + server + `",connection_security_policy="mutual_tls"} 0
istio_tcp_connections_opened_total{reporter="destination",source_principal="` + client + `",destination_principal="` + server + `",connection_security_policy="mutual_tls"} 1
`)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, reporter string
		want           string // formatted as the report prints it; "" for none
	}{
		{"a series without the destination principal, or that counted nothing, is not it", "source", ""},
		{"the series of the reporter, with both principals, that counted the connection", "destination",
			`istio_tcp_connections_opened_total{reporter="destination",connection_security_policy="mutual_tls"} 1`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if s := istioOpened(ms, tt.reporter, client, server); s != nil {
				got = s.Format("reporter", "connection_security_policy")
			}
			if got != tt.want {
				t.Errorf("= %q, want %q", got, tt.want)
			}
		})
	}
}
