// Package tools is a nested module for what packages and checks mantlet's
// deployment: the container image (image, 'make image'), the rendered
// manifest of the Helm chart (manifests, 'make manifests') and the chart's
// tests against a real API server (chart). It is a module of its own so
// that Helm's and go-containerregistry's dependencies never reach the
// mantlet binary's go.mod.
package tools
