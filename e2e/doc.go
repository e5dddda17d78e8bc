// Package e2e holds mantlet's end-to-end tests: real `mantlet agent`
// processes on a testbed of network namespaces (internal/meshtest), driven
// by traffic between pods and checked on the pods, in the agents' logs and
// counters, and on the underlay. They need root; run them with
// `go test ./e2e/` as root (CI=true turns a skip into a failure).
package e2e
