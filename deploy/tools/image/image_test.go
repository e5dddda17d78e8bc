package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const root = "../../.."

var (
	amd64 = v1.Platform{OS: "linux", Architecture: "amd64"}
	arm64 = v1.Platform{OS: "linux", Architecture: "arm64"}
)

// archive writes an archive of fake binaries (their platform as content)
// and returns its bytes and the binaries' contents by platform.
func archive(t *testing.T, ref string, created time.Time) ([]byte, map[string][]byte) {
	t.Helper()
	dir := t.TempDir()
	opts := Options{Name: ref, Platforms: []v1.Platform{amd64, arm64}, Binaries: map[string]string{}, Plugins: map[string]string{}, Created: created}
	contents := map[string][]byte{}
	for _, p := range opts.Platforms {
		k := platformKey(p)
		contents[k] = []byte("#!fake mantlet for " + k + "\n")
		path := filepath.Join(dir, strings.ReplaceAll(k, "/", "-"))
		if err := os.WriteFile(path, contents[k], 0o755); err != nil {
			t.Fatal(err)
		}
		opts.Binaries[k] = path
		plugin := path + "-cni"
		if err := os.WriteFile(plugin, append([]byte("cni "), contents[k]...), 0o755); err != nil {
			t.Fatal(err)
		}
		opts.Plugins[k] = plugin
	}
	idx, imgs, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, tag, idx, imgs[0], created); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), contents
}

// untar extracts an archive into a new folder, refusing anything but
// plain files and folders under it.
func untar(t *testing.T, b []byte) string {
	t.Helper()
	dir := t.TempDir()
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return dir
		}
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(path, dir+string(filepath.Separator)) {
			t.Fatalf("archive entry %q leaves the folder", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(path, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %q of type %c", h.Name, h.Typeflag)
		}
	}
}

// layerFiles lists the files of img's only layer.
func layerFiles(t *testing.T, img v1.Image) map[string]*tar.Header {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers (%v), want one", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		h.PAXRecords = map[string]string{"content": string(data)}
		out[h.Name] = h
	}
}

func TestArchiveIsAnOCILayoutNamedForContainerd(t *testing.T) {
	created := time.Unix(1700000000, 0).UTC()
	b, contents := archive(t, "registry.example/mantlet/mantlet:0.1.0", created)
	dir := untar(t, b)

	var top v1.IndexManifest
	raw, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &top); err != nil {
		t.Fatal(err)
	}
	if len(top.Manifests) != 1 {
		t.Fatalf("index.json names %d manifests, want the one index", len(top.Manifests))
	}
	desc := top.Manifests[0]
	if desc.MediaType != types.OCIImageIndex {
		t.Errorf("index.json points at a %s, want an OCI image index", desc.MediaType)
	}
	if got := desc.Annotations[AnnotationContainerName]; got != "registry.example/mantlet/mantlet:0.1.0" {
		t.Errorf("%s = %q, want the full reference (containerd's image name)", AnnotationContainerName, got)
	}
	if got := desc.Annotations[AnnotationRefName]; got != "0.1.0" {
		t.Errorf("%s = %q, want the tag", AnnotationRefName, got)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "oci-layout")); err != nil || !strings.Contains(string(b), `"imageLayoutVersion":"1.0.0"`) {
		t.Errorf("oci-layout: %q %v", b, err)
	}

	// Read back as an OCI layout, as ctr (and crane, from a folder) does.
	lp, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	outer, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	idx, err := outer.ImageIndex(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var platforms []string
	for _, m := range im.Manifests {
		if m.Platform == nil {
			t.Fatalf("manifest %s has no platform", m.Digest)
		}
		platforms = append(platforms, m.Platform.String())
		img, err := idx.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		checkImage(t, img, *m.Platform, contents[platformKey(*m.Platform)], created, false)
	}
	if !slices.Equal(platforms, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("platforms %v, want linux/amd64 and linux/arm64", platforms)
	}
}

// checkImage checks img's platform, entrypoint, times and only files (the
// binary and the CNI plugin, whose fake content is the binary's after
// "cni "). Read
// from a Docker archive, its manifest is Docker's, made by the reader;
// otherwise it must be OCI.
func checkImage(t *testing.T, img v1.Image, p v1.Platform, binary []byte, created time.Time, docker bool) {
	t.Helper()
	want := types.OCIManifestSchema1
	if docker {
		want = types.DockerManifestSchema2
	}
	mt, err := img.MediaType()
	if err != nil || mt != want {
		t.Errorf("%s: manifest media type %s %v, want %s", p, mt, err, want)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != p.OS || cf.Architecture != p.Architecture {
		t.Errorf("%s: config says %s/%s", p, cf.OS, cf.Architecture)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/mantlet"}) || len(cf.Config.Cmd) != 0 || cf.Config.User != "" {
		t.Errorf("%s: entrypoint %q cmd %q user %q, want /mantlet alone, as root", p, cf.Config.Entrypoint, cf.Config.Cmd, cf.Config.User)
	}
	if !cf.Created.Time.Equal(created) || len(cf.History) != 1 || !cf.History[0].Created.Time.Equal(created) {
		t.Errorf("%s: created %v, history %+v, want every time %v", p, cf.Created, cf.History, created)
	}
	files := layerFiles(t, img)
	h, ok := files["mantlet"]
	plugin, pok := files["mantlet-cni"]
	if len(files) != 2 || !ok || !pok {
		t.Fatalf("%s: layer holds %v, want mantlet and mantlet-cni alone", p, files)
	}
	if h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(created) || h.PAXRecords["content"] != string(binary) {
		t.Errorf("%s: /mantlet mode %o uid %d gid %d time %v, content %q", p, h.Mode, h.Uid, h.Gid, h.ModTime, h.PAXRecords["content"])
	}
	if plugin.Mode != 0o755 || !plugin.ModTime.Equal(created) || plugin.PAXRecords["content"] != "cni "+string(binary) {
		t.Errorf("%s: /mantlet-cni mode %o time %v, content %q", p, plugin.Mode, plugin.ModTime, plugin.PAXRecords["content"])
	}
}

// TestArchiveIsADockerArchiveThatCranePushes reads the archive as 'crane
// push FILE' does (a docker-style tarball) and pushes it to a registry
// (go-containerregistry's in-memory one, on loopback).
func TestArchiveIsADockerArchiveThatCranePushes(t *testing.T) {
	b, contents := archive(t, "registry.example/mantlet/mantlet:0.1.0", time.Unix(0, 0).UTC())
	path := filepath.Join(t.TempDir(), "mantlet-image.tar")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, img, amd64, contents["linux/amd64"], time.Unix(0, 0).UTC(), true)
	tagged, err := tarball.ImageFromPath(path, ptr(name.MustParseReference("registry.example/mantlet/mantlet:0.1.0").(name.Tag)))
	if err != nil {
		t.Errorf("manifest.json does not tag the image with its name: %v", err)
	} else if d1, d2 := digest(t, img), digest(t, tagged); d1 != d2 {
		t.Errorf("by name %s, alone %s", d2, d1)
	}

	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.NewTag(u.Host+"/mesh/mantlet:0.1.0", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	pulled, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, pulled, amd64, contents["linux/amd64"], time.Unix(0, 0).UTC(), true)
	if digest(t, pulled) != digest(t, img) {
		t.Errorf("pushed %s, pulled %s", digest(t, img), digest(t, pulled))
	}
}

func TestArchivesAreReproducible(t *testing.T) {
	created := time.Unix(1700000000, 0).UTC()
	a, _ := archive(t, "registry.example/mantlet/mantlet:0.1.0", created)
	b, _ := archive(t, "registry.example/mantlet/mantlet:0.1.0", created)
	if sha256.Sum256(a) != sha256.Sum256(b) {
		t.Error("the same binaries made two different archives")
	}
	tr := tar.NewReader(bytes.NewReader(a))
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(created) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: time %v owner %d:%d", h.Name, h.ModTime, h.Uid, h.Gid)
		}
		names = append(names, h.Name)
	}
	if !slices.IsSorted(names) {
		t.Errorf("entries %v not sorted", names)
	}
}

func TestDockerHubNamesAreContainerdNames(t *testing.T) {
	for _, c := range []struct{ ref, want string }{
		{"registry.example/mantlet/mantlet:0.1.0", "registry.example/mantlet/mantlet:0.1.0"},
		{"mantlet/mantlet:dev", "docker.io/mantlet/mantlet:dev"},
		{"localhost:5000/mantlet:1", "localhost:5000/mantlet:1"},
	} {
		ref, err := name.ParseReference(c.ref)
		if err != nil {
			t.Fatal(err)
		}
		if got := containerdName(ref); got != c.want {
			t.Errorf("containerdName(%s) = %s, want %s", c.ref, got, c.want)
		}
	}
}

func TestDefaultNameIsTheChartsImage(t *testing.T) {
	got, err := DefaultName(filepath.Join(root, "deploy", "charts", "mantlet"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got, "registry.example/mantlet/mantlet:") {
		t.Errorf("default name %s, want the chart's registry.example/mantlet/mantlet:<appVersion>", got)
	}
}

func TestPlatformsParse(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    string
		wantErr bool
	}{
		{"linux/amd64,linux/arm64", "linux/amd64 linux/arm64", false},
		{" linux/arm64 ", "linux/arm64", false},
		{"windows/amd64", "", true},
		{"amd64", "", true},
		{"linux/arm/v7", "", true},
	} {
		ps, err := ParsePlatforms(c.in)
		var got []string
		for _, p := range ps {
			got = append(got, platformKey(p))
		}
		if (err != nil) != c.wantErr || strings.Join(got, " ") != c.want {
			t.Errorf("ParsePlatforms(%q) = %v, %v", c.in, got, err)
		}
	}
}

// TestTheRealBinaryRunsFromTheImage builds cmd/mantlet for this machine as
// 'make image' does, lays it into an image, takes it out of the layer
// again and runs it: the binary is static, it needs nothing else.
func TestTheRealBinaryRunsFromTheImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/mantlet")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute) // a cold build on a loaded machine takes minutes
	defer cancel()
	// go test puts its own Go first in the PATH of the test.
	goCmd := "go"
	if g := os.Getenv("GO"); g != "" {
		goCmd = g
	}
	p := hostPlatform()
	bin, err := BuildBinary(ctx, goCmd, root, t.TempDir(), p)
	if err != nil {
		t.Fatal(err)
	}
	idx, imgs, err := Build(Options{Platforms: []v1.Platform{p}, Binaries: map[string]string{platformKey(p): bin}, Created: time.Unix(0, 0)})
	if err != nil || idx == nil {
		t.Fatal(err)
	}
	files := layerFiles(t, imgs[0])
	out := filepath.Join(t.TempDir(), "mantlet")
	if err := os.WriteFile(out, []byte(files["mantlet"].PAXRecords["content"]), 0o755); err != nil {
		t.Fatal(err)
	}
	if elf, err := exec.CommandContext(ctx, "file", out).Output(); err == nil && !strings.Contains(string(elf), "statically linked") {
		t.Errorf("the binary is not static: %s", elf)
	}
	cmd := exec.CommandContext(ctx, out, "version")
	cmd.Env = []string{} // nothing from the environment, as in the image
	got, err := cmd.CombinedOutput()
	if err != nil || !strings.HasPrefix(string(got), "mantlet ") {
		t.Errorf("mantlet version: %q, %v", got, err)
	}
}

func digest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func ptr[T any](v T) *T { return &v }
