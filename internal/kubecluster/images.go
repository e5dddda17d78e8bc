package kubecluster

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// The test images, built from internal/kubecluster/testapp. Their
// registry is made up, and the nodes never pull: the images are imported
// into each node's containerd, and pods use them with imagePullPolicy
// Never (the sandbox image is found locally, so containerd never tries to
// pull it either).
const (
	PauseImage  = "mantlet.test/pause:1"
	EchoImage   = "mantlet.test/echo:1"
	ClientImage = "mantlet.test/client:1"
)

// testAppPackage is the program in the test images.
const testAppPackage = "./internal/kubecluster/testapp"

// testImages are the images of the test archive and their entrypoints.
var testImages = []struct{ ref, cmd string }{
	{PauseImage, "pause"},
	{EchoImage, "echo"},
	{ClientImage, "client"},
}

// buildTestImages builds testapp statically and writes an OCI image
// layout archive with the three test images into out, all sharing one
// layer that holds the program at /testapp.
func buildTestImages(ctx context.Context, repo, out string) error {
	tmp, err := os.MkdirTemp("", "kubecluster-testapp-")
	if err != nil {
		return fmt.Errorf("kubecluster: test images: %w", err)
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "testapp")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, testAppPackage)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kubecluster: build %s: %w: %s", testAppPackage, err, strings.TrimSpace(string(b)))
	}
	prog, err := os.ReadFile(bin)
	if err != nil {
		return fmt.Errorf("kubecluster: test images: %w", err)
	}
	var imgs []ociImage
	for _, ti := range testImages {
		imgs = append(imgs, ociImage{ref: ti.ref, entrypoint: []string{"/testapp", ti.cmd}})
	}
	b, err := ociArchive(map[string][]byte{"testapp": prog}, imgs)
	if err != nil {
		return err
	}
	return writeFileAtomic(out, b)
}

// ociImage is one image of an archive: a name and what it runs.
type ociImage struct {
	ref        string
	entrypoint []string
}

// ociArchive returns an OCI image layout, as a tar stream, holding imgs,
// each of one layer with files (at the root, mode 0755) for this machine's
// platform, named for containerd by the annotation
// io.containerd.image.name. Timestamps are zero, so the same files make
// the same archive.
func ociArchive(files map[string][]byte, imgs []ociImage) ([]byte, error) {
	var zero time.Time
	// The layer: an uncompressed tar is its diff ID; the blob is gzipped.
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	for name, b := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(b)), ModTime: zero, Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("kubecluster: image layer: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return nil, fmt.Errorf("kubecluster: image layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("kubecluster: image layer: %w", err)
	}
	diffID := digestOf(layer.Bytes())
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(layer.Bytes()); err != nil {
		return nil, fmt.Errorf("kubecluster: image layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("kubecluster: image layer: %w", err)
	}

	blobs := map[string][]byte{}
	add := func(b []byte) descriptor {
		d := digestOf(b)
		blobs[d] = b
		return descriptor{Digest: d, Size: int64(len(b))}
	}
	layerDesc := add(gz.Bytes())
	layerDesc.MediaType = "application/vnd.oci.image.layer.v1.tar+gzip"
	var index struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}
	index.SchemaVersion, index.MediaType = 2, "application/vnd.oci.image.index.v1+json"
	for _, img := range imgs {
		config := map[string]any{
			"architecture": runtime.GOARCH,
			"os":           "linux",
			"config":       map[string]any{"Entrypoint": img.entrypoint, "Env": []string{"PATH=/"}},
			"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
		}
		cb, err := json.Marshal(config)
		if err != nil {
			return nil, fmt.Errorf("kubecluster: image config: %w", err)
		}
		cd := add(cb)
		cd.MediaType = "application/vnd.oci.image.config.v1+json"
		manifest := map[string]any{
			"schemaVersion": 2,
			"mediaType":     "application/vnd.oci.image.manifest.v1+json",
			"config":        cd,
			"layers":        []descriptor{layerDesc},
		}
		mb, err := json.Marshal(manifest)
		if err != nil {
			return nil, fmt.Errorf("kubecluster: image manifest: %w", err)
		}
		md := add(mb)
		md.MediaType = "application/vnd.oci.image.manifest.v1+json"
		_, tag, _ := strings.Cut(img.ref[strings.LastIndex(img.ref, "/")+1:], ":")
		md.Annotations = map[string]string{"io.containerd.image.name": img.ref, "org.opencontainers.image.ref.name": tag}
		md.Platform = &platform{OS: "linux", Architecture: runtime.GOARCH}
		index.Manifests = append(index.Manifests, md)
	}
	ib, err := json.Marshal(index)
	if err != nil {
		return nil, fmt.Errorf("kubecluster: image index: %w", err)
	}

	var out bytes.Buffer
	aw := tar.NewWriter(&out)
	put := func(name string, b []byte) error {
		if err := aw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: zero, Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := aw.Write(b)
		return err
	}
	if err := put("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return nil, fmt.Errorf("kubecluster: image archive: %w", err)
	}
	if err := put("index.json", ib); err != nil {
		return nil, fmt.Errorf("kubecluster: image archive: %w", err)
	}
	for _, d := range slices.Sorted(maps.Keys(blobs)) {
		if err := put("blobs/sha256/"+strings.TrimPrefix(d, "sha256:"), blobs[d]); err != nil {
			return nil, fmt.Errorf("kubecluster: image archive: %w", err)
		}
	}
	if err := aw.Close(); err != nil {
		return nil, fmt.Errorf("kubecluster: image archive: %w", err)
	}
	return out.Bytes(), nil
}

// descriptor is an OCI content descriptor.
type descriptor struct {
	MediaType   string            `json:"mediaType,omitempty"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
}

func digestOf(b []byte) string {
	h := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(h[:])
}

// buildMantletImage writes the agent's image for this machine's platform
// into out, as 'make image' does (deploy/tools/image), named as the chart
// expects.
func buildMantletImage(ctx context.Context, repo, out string) error {
	cmd := exec.CommandContext(ctx, "go", "run", "./image", "-root", repo, "-out", out, "-platforms", "linux/"+runtime.GOARCH)
	cmd.Dir = filepath.Join(repo, "deploy", "tools")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kubecluster: build the mantlet image (make image): %w: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

// writeFileAtomic writes b to path whole or not at all.
func writeFileAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("kubecluster: %w", err)
	}
	tmp := path + ".part"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("kubecluster: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("kubecluster: %w", err)
	}
	return nil
}
