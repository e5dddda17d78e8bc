// Package interop holds tests that check mantlet's HBONE tunnel against
// Istio's HBONE client and server (istio.io/istio/pkg/hbone). It lives in
// its own Go module so that Istio's large dependency tree stays out of
// mantlet's go.mod.
package interop
