package scenario

import "testing"

func TestParsePromReadsSamplesAndLabels(t *testing.T) {
	body := `# HELP istio_tcp_connections_opened_total Connections opened.
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_principal="spiffe://cluster.local/ns/shop/sa/client",response_flags="-"} 1
mantlet_agent_ready 1
odd_label{msg="a \"quoted\" word, and a comma"} 2.5
not a sample line
`
	got := parseProm(body)
	want := []string{
		`istio_tcp_connections_opened_total{reporter="source",source_principal="spiffe://cluster.local/ns/shop/sa/client",response_flags="-"} 1`,
		`mantlet_agent_ready 1`,
		`odd_label{msg="a \"quoted\" word, and a comma"} 2.5`,
	}
	if len(got) != len(want) {
		t.Fatalf("got %d samples %v, want %d", len(got), got, len(want))
	}
	for i, s := range got {
		if f := s.format("reporter", "source_principal", "response_flags", "msg"); f != want[i] {
			t.Errorf("sample %d = %s, want %s", i, f, want[i])
		}
	}
	if s := istioOpened(got, "source", "spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/server"); s != nil {
		t.Errorf("matched a sample without the destination principal: %v", s)
	}
}
