package kubecluster

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"
)

// TestArchiveIsAnOCILayoutThatNamesEachImage: the archive that containerd
// imports holds oci-layout, an index naming every image for containerd,
// and blobs whose names are their digests.
func TestArchiveIsAnOCILayoutThatNamesEachImage(t *testing.T) {
	b, err := ociArchive(map[string][]byte{"testapp": []byte("#!/bin/true\n")}, []ociImage{
		{ref: "mantlet.test/pause:1", entrypoint: []string{"/testapp", "pause"}},
		{ref: "mantlet.test/echo:1", entrypoint: []string{"/testapp", "echo"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if out := os.Getenv("KUBECLUSTER_WRITE_ARCHIVE"); out != "" {
		_ = os.WriteFile(out, b, 0o644)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %q", files["oci-layout"])
	}
	for name, data := range files {
		if hex, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && digestOf(data) != "sha256:"+hex {
			t.Errorf("blob %s has digest %s", name, digestOf(data))
		}
	}
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range index.Manifests {
		names = append(names, m.Annotations["io.containerd.image.name"])
		if _, ok := files["blobs/sha256/"+strings.TrimPrefix(m.Digest, "sha256:")]; !ok {
			t.Errorf("manifest %s is not in the archive", m.Digest)
		}
	}
	if got := strings.Join(names, " "); got != "mantlet.test/pause:1 mantlet.test/echo:1" {
		t.Errorf("images %q", got)
	}
}
