// Command manifests writes deploy/mantlet.yaml, the Helm chart
// deploy/charts/mantlet rendered with its default values for 'kubectl
// apply -f' ('make manifests'). With -check it writes nothing and fails
// when the file differs from a fresh rendering.
//
// Usage (from deploy/tools): go run ./manifests [-root ../..] [-check]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/mantlet/mantlet/deploy/tools/chart"
)

func main() {
	root := flag.String("root", "../..", "the repository's root")
	check := flag.Bool("check", false, "fail if "+chart.ManifestFile+" is not what the chart renders, instead of writing it")
	flag.Parse()
	if err := run(*root, *check); err != nil {
		fmt.Fprintln(os.Stderr, "manifests:", err)
		os.Exit(1)
	}
}

func run(root string, check bool) error {
	want, err := chart.Manifest(root)
	if err != nil {
		return err
	}
	path := filepath.Join(root, chart.ManifestFile)
	if check {
		got, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s is stale: run 'make manifests' and commit it", chart.ManifestFile)
		}
		return nil
	}
	if err := os.WriteFile(path, want, 0o644); err != nil {
		return err
	}
	crd, err := chart.HasCRD(root)
	if err != nil {
		return err
	}
	if !crd {
		fmt.Fprintf(os.Stderr, "manifests: %s does not exist yet: %s has no MeshPolicy CRD\n", chart.CRDFile, chart.ManifestFile)
	}
	fmt.Printf("wrote %s\n", chart.ManifestFile)
	return nil
}
