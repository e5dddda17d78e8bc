package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"sigs.k8s.io/yaml"
)

// Annotations of index.json that name the image: the OCI tag, and the
// full reference that containerd ('ctr images import', 'kind load
// image-archive') takes as the image's name.
const (
	AnnotationRefName       = "org.opencontainers.image.ref.name"
	AnnotationContainerName = "io.containerd.image.name"
)

// Entrypoint is where the binary sits in the image, and what it runs.
const Entrypoint = "/mantlet"

// PluginPath is where the CNI plugin sits in the image, beside the
// binary, where 'mantlet agent --cni' looks for it.
const PluginPath = "/mantlet-cni"

// Options describe one image archive.
type Options struct {
	// Name is the image's reference, for example
	// registry.example/mantlet/mantlet:0.1.0.
	Name string
	// Platforms are the os/arch pairs of the index, the first one also the
	// image of the Docker-compatible manifest.json.
	Platforms []v1.Platform
	// Binaries are the static mantlet binaries, one per platform, as
	// "os/arch".
	Binaries map[string]string
	// Plugins are the static mantlet-cni binaries (the CNI plugin the
	// agent installs on its node), by platform; each goes to PluginPath.
	Plugins map[string]string
	// Created is the time of every timestamp in the archive (config,
	// history, layer and tar entries), for reproducible archives.
	Created time.Time
}

// ParsePlatforms parses a comma-separated list of os/arch.
func ParsePlatforms(s string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, p := range strings.Split(s, ",") {
		os, arch, ok := strings.Cut(strings.TrimSpace(p), "/")
		if !ok || os != "linux" || arch == "" || strings.Contains(arch, "/") {
			return nil, fmt.Errorf("platform %q: want linux/<arch>", p)
		}
		out = append(out, v1.Platform{OS: os, Architecture: arch})
	}
	return out, nil
}

func platformKey(p v1.Platform) string { return p.OS + "/" + p.Architecture }

// DefaultName is the image name the chart in chartDir expects by default:
// its values' image.repository, tagged with its appVersion.
func DefaultName(chartDir string) (string, error) {
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	var values struct {
		Image struct {
			Repository string `json:"repository"`
		} `json:"image"`
	}
	for file, out := range map[string]any{"Chart.yaml": &chart, "values.yaml": &values} {
		b, err := os.ReadFile(filepath.Join(chartDir, file))
		if err != nil {
			return "", fmt.Errorf("image: default name: %w", err)
		}
		if err := yaml.Unmarshal(b, out); err != nil {
			return "", fmt.Errorf("image: default name: %s: %w", file, err)
		}
	}
	if chart.AppVersion == "" || values.Image.Repository == "" {
		return "", fmt.Errorf("image: default name: %s has no appVersion or no image.repository", chartDir)
	}
	return values.Image.Repository + ":" + chart.AppVersion, nil
}

// BuildBinary builds cmd/mantlet of the module at root for p, static and
// stripped, into dir, and returns its path. goCmd is the go command.
func BuildBinary(ctx context.Context, goCmd, root, dir string, p v1.Platform) (string, error) {
	return buildCommand(ctx, goCmd, root, dir, "mantlet", p)
}

// BuildPlugin builds cmd/mantlet-cni, the CNI plugin, as BuildBinary
// builds cmd/mantlet.
func BuildPlugin(ctx context.Context, goCmd, root, dir string, p v1.Platform) (string, error) {
	return buildCommand(ctx, goCmd, root, dir, "mantlet-cni", p)
}

func buildCommand(ctx context.Context, goCmd, root, dir, name string, p v1.Platform) (string, error) {
	out := filepath.Join(dir, name+"-"+p.OS+"-"+p.Architecture)
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Architecture)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("image: build %s for %s: %w", name, platformKey(p), err)
	}
	return out, nil
}

// Build makes the image index of opts: one image per platform, each a
// single layer holding the binary at /mantlet, its entrypoint.
func Build(opts Options) (v1.ImageIndex, []v1.Image, error) {
	if len(opts.Platforms) == 0 {
		return nil, nil, errors.New("image: no platform")
	}
	var idx v1.ImageIndex = empty.Index
	var imgs []v1.Image
	for _, p := range opts.Platforms {
		bin, ok := opts.Binaries[platformKey(p)]
		if !ok {
			return nil, nil, fmt.Errorf("image: no binary for %s", platformKey(p))
		}
		img, err := buildImage(bin, opts.Plugins[platformKey(p)], p, opts)
		if err != nil {
			return nil, nil, err
		}
		imgs = append(imgs, img)
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}
	return idx, imgs, nil
}

func buildImage(bin, plugin string, p v1.Platform, opts Options) (v1.Image, error) {
	var layerTar bytes.Buffer
	tw := tar.NewWriter(&layerTar)
	files := [][2]string{{bin, Entrypoint}}
	if plugin != "" {
		files = append(files, [2]string{plugin, PluginPath})
	}
	for _, f := range files {
		b, err := os.ReadFile(f[0])
		if err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(f[1], "/"), Mode: 0o755, Size: int64(len(b)),
			ModTime: opts.Created, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("image: layer: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return nil, fmt.Errorf("image: layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image: layer: %w", err)
	}
	raw := layerTar.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("image: layer: %w", err)
	}
	created := v1.Time{Time: opts.Created}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer,
		History: v1.History{Created: created, CreatedBy: "mantlet-image: COPY mantlet " + Entrypoint + " (and mantlet-cni " + PluginPath + ")"}})
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	cf.Created = created
	cf.Config = v1.Config{
		Entrypoint: []string{Entrypoint},
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":    "mantlet",
			"org.opencontainers.image.source":   "https://github.com/mantlet/mantlet",
			"org.opencontainers.image.licenses": "Apache-2.0",
		},
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return img, nil
}

// containerdName is ref as containerd names images: fully qualified,
// Docker Hub as docker.io.
func containerdName(ref name.Reference) string {
	s := ref.Name()
	if rest, ok := strings.CutPrefix(s, name.DefaultRegistry+"/"); ok {
		return "docker.io/" + rest
	}
	return s
}

// WriteArchive writes idx, named ref, as one tar that is both an OCI image
// layout (oci-layout, index.json, blobs/sha256/...; what 'ctr images
// import' and 'kind load image-archive' read, with the reference in the
// annotations of index.json) and a Docker archive (manifest.json,
// pointing at the same blobs; what 'crane push FILE' and 'docker load'
// read), as 'docker save' writes since Docker 25. manifest.json can name
// one image: first's. Entries are sorted and stamped with created, so the
// same images make the same bytes.
func WriteArchive(w io.Writer, ref name.Tag, idx v1.ImageIndex, first v1.Image, created time.Time) error {
	blobs := map[string][]byte{}
	add := func(b []byte) string {
		h, _, _ := v1.SHA256(bytes.NewReader(b))
		blobs[h.Hex] = b
		return "blobs/sha256/" + h.Hex
	}
	rawIdx, err := idx.RawManifest()
	if err != nil {
		return fmt.Errorf("image: index: %w", err)
	}
	add(rawIdx)
	im, err := idx.IndexManifest()
	if err != nil {
		return fmt.Errorf("image: index: %w", err)
	}
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			return fmt.Errorf("image: %s: %w", d.Digest, err)
		}
		if err := addImage(img, add); err != nil {
			return err
		}
	}
	idxDesc, err := partialDescriptor(idx)
	if err != nil {
		return err
	}
	idxDesc.Annotations = map[string]string{AnnotationRefName: ref.TagStr(), AnnotationContainerName: containerdName(ref)}
	top := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{*idxDesc}}

	cfgName, err := first.ConfigName()
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	layers, err := first.Layers()
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	docker := []tarball.Descriptor{{Config: "blobs/sha256/" + cfgName.Hex, RepoTags: []string{ref.String()}}}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		docker[0].Layers = append(docker[0].Layers, "blobs/sha256/"+d.Hex)
	}

	files := map[string][]byte{"oci-layout": []byte(`{"imageLayoutVersion":"1.0.0"}`)}
	if files["index.json"], err = json.Marshal(top); err != nil {
		return fmt.Errorf("image: index.json: %w", err)
	}
	if files["manifest.json"], err = json.Marshal(docker); err != nil {
		return fmt.Errorf("image: manifest.json: %w", err)
	}
	for hex, b := range blobs {
		files["blobs/sha256/"+hex] = b
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)

	tw := tar.NewWriter(w)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: created, Format: tar.FormatPAX}); err != nil {
			return fmt.Errorf("image: archive: %w", err)
		}
	}
	for _, n := range names {
		b := files[n]
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(b)), ModTime: created, Format: tar.FormatPAX}); err != nil {
			return fmt.Errorf("image: archive: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return fmt.Errorf("image: archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image: archive: %w", err)
	}
	return nil
}

// addImage adds img's manifest, config and layers to the blobs.
func addImage(img v1.Image, add func([]byte) string) error {
	m, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("image: manifest: %w", err)
	}
	add(m)
	c, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("image: config: %w", err)
	}
	add(c)
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("image: layers: %w", err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return fmt.Errorf("image: layer: %w", err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("image: layer: %w", err)
		}
		add(b)
	}
	return nil
}

// partialDescriptor is the descriptor of idx.
func partialDescriptor(idx v1.ImageIndex) (*v1.Descriptor, error) {
	mt, err := idx.MediaType()
	if err != nil {
		return nil, fmt.Errorf("image: index: %w", err)
	}
	d, err := idx.Digest()
	if err != nil {
		return nil, fmt.Errorf("image: index: %w", err)
	}
	n, err := idx.Size()
	if err != nil {
		return nil, fmt.Errorf("image: index: %w", err)
	}
	return &v1.Descriptor{MediaType: mt, Digest: d, Size: n}, nil
}

// hostPlatform is the platform of the machine the tool runs on.
func hostPlatform() v1.Platform { return v1.Platform{OS: "linux", Architecture: runtime.GOARCH} }
