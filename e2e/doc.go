// Package e2e holds mantlet's end-to-end tests: real `mantlet agent`
// processes on a testbed of network namespaces (internal/meshtest), driven
// by traffic between pods and checked on the pods, through the agents'
// admin APIs, metrics, logs and counters, and on the underlay. They need
// root; run them with
// `go test ./e2e/` as root (under CI=true a skip is a failure). TestMain
// builds the mantlet command once ($MANTLET_TEST_BINARY names a prebuilt
// one instead) and, after the tests, fails if a namespace or pin of theirs
// is left.
//
// One test per scenario a user would recognise, each on a mesh of its own:
//
//   - TestMeshedPodsTalkAcrossNodesAndOnOneNode: bytes intact both ways,
//     the client pod's IP at the server, getpeername as dialled,
//     half-close in both directions;
//   - TestUnderlayCarriesOnlyTLS13ToTheDestinationPodsPort15008: no marker
//     in clear, TLS 1.3 (ALPN h2, no SNI) to the pod's IP on 15008 only,
//     the destination workload's SVID presented, both identities recorded;
//   - TestUnmeshedAndOptedOutPodsAreNotCaptured;
//   - TestAPodForgingAnotherPodsIPIsDroppedAndCounted;
//   - TestStrictDropsPlaintextFromUnmeshedPodsAndPermissiveLetsItPass;
//   - TestAgentsFailClosedAndAdoptTheirPinsOnRestart (its comment says
//     exactly what it proves);
//   - TestAnnotatingANamespaceEnrollsItsPodsAtRuntime;
//   - TestFederatedTrustDomains: two agents of two trust domains with two
//     CAs, each federating the other's bundle; policies on foreign
//     principals; a cross-domain forgery and a missing bundle refused;
//   - TestSPIREIssuesTheSVIDsAndItsRotationsDropNothing and
//     TestSPIREDownTheAgentsKeepServingTheirSVIDs: SPIRE as the CA (real
//     SPIRE binaries from internal/spiretest, `make spire-binaries`);
//   - TestAgentScaleSmoke: every change made through the API server reaches
//     the data path of an agent in Kubernetes mode, quiet and while other
//     pods change; BenchmarkAgentScale is the same on a 10,000-pod cluster,
//     measuring the agent's memory, CPU and change latency
//     (docs/performance.md).
package e2e
