// Command image builds the container image of mantlet without a Docker
// daemon ('make image'): a static, stripped cmd/mantlet for each platform,
// alone in one layer at /mantlet, the entrypoint; no base image. It writes
// one archive (default bin/mantlet-image.tar) that is an OCI image layout
// (an index of the platforms, named in index.json's annotations) and a
// Docker archive (manifest.json, for the first platform), so that any of
// these loads it:
//
//	ctr -n k8s.io images import bin/mantlet-image.tar
//	kind load image-archive bin/mantlet-image.tar
//	crane push bin/mantlet-image.tar REGISTRY/mantlet:TAG
//
// The name defaults to what the Helm chart runs: its values'
// image.repository, tagged with its appVersion. Every timestamp is
// SOURCE_DATE_EPOCH (default 0), so the same sources and Go make the same
// archive.
//
// Usage (from deploy/tools): go run ./image [-root ../..] [-out FILE] [-name REF] [-platforms linux/amd64,linux/arm64]
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
)

func main() {
	root := flag.String("root", "../..", "the repository's root")
	out := flag.String("out", "", "the archive to write (default <root>/bin/mantlet-image.tar)")
	ref := flag.String("name", "", "the image's reference (default the chart's image.repository:appVersion)")
	platforms := flag.String("platforms", "linux/amd64,linux/arm64", "os/arch of the images, comma-separated; the first is also the Docker archive's")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *root, *out, *ref, *platforms); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, root, out, ref, platforms string) error {
	if out == "" {
		out = filepath.Join(root, "bin", "mantlet-image.tar")
	}
	if ref == "" {
		var err error
		if ref, err = DefaultName(filepath.Join(root, "deploy", "charts", "mantlet")); err != nil {
			return err
		}
	}
	tag, err := name.NewTag(ref, name.StrictValidation)
	if err != nil {
		return fmt.Errorf("-name %q: want registry/repository:tag: %w", ref, err)
	}
	ps, err := ParsePlatforms(platforms)
	if err != nil {
		return fmt.Errorf("-platforms: %w", err)
	}
	created := time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, err)
		}
		created = time.Unix(n, 0).UTC()
	}
	tmp, err := os.MkdirTemp("", "mantlet-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	opts := Options{Name: ref, Platforms: ps, Binaries: map[string]string{}, Plugins: map[string]string{}, Created: created}
	for _, p := range ps {
		bin, err := BuildBinary(ctx, goCmd, root, tmp, p)
		if err != nil {
			return err
		}
		opts.Binaries[platformKey(p)] = bin
		if opts.Plugins[platformKey(p)], err = BuildPlugin(ctx, goCmd, root, tmp, p); err != nil {
			return err
		}
	}
	idx, imgs, err := Build(opts)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, tag, idx, imgs[0], created); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	// Written whole or not at all.
	part := out + ".part"
	if err := os.WriteFile(part, buf.Bytes(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(part, out); err != nil {
		return err
	}
	d, err := idx.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("wrote %s: %s (%s), index %s, %d bytes\n", out, tag, platforms, d, buf.Len())
	return nil
}
