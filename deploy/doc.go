// Package deploy holds what operators deploy next to mantlet: a Grafana
// dashboard (grafana-dashboard.json), Prometheus alerting rules
// (alerts.yaml) and a DaemonSet for 'mantlet agent' (daemonset.yaml). Its
// test checks that every metric they name exists in the agent's registry.
package deploy
