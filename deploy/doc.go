// Package deploy holds what operators deploy next to mantlet, and the test
// that checks that every metric the dashboards and alerts name exists in
// the agent's registry:
//
//   - charts/mantlet: the Helm chart (the agent's DaemonSet in Kubernetes
//     mode, its ServiceAccount and RBAC, the MeshPolicy CRD, a PodMonitor
//     and the dashboard as options), documented in its README.md;
//   - mantlet.yaml: that chart rendered with its default values, for
//     'kubectl apply -f' ('make manifests' writes it; the nested module
//     deploy/tools renders it with Helm's library, checks it is current
//     and applies it to a real API server in its tests);
//   - daemonset.yaml: the standalone example, kept beside the chart: the
//     agent reads workloads and policies from a cluster file in a
//     ConfigMap (--config) instead of the API server, and runs privileged;
//   - grafana-dashboard.json (copied into the chart as
//     charts/mantlet/files/grafana-dashboard.json) and alerts.yaml
//     (Prometheus alerting rules).
//
// deploy/tools also builds the agent's container image ('make image').
package deploy
