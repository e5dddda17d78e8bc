package rawfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestDirReaderListsEveryEntryWithoutGarbage: Each names every entry of a
// directory of more entries than one read takes, and a second reading
// allocates nothing.
func TestDirReaderListsEveryEntryWithoutGarbage(t *testing.T) {
	dir := t.TempDir()
	var want []string
	for i := range 600 { // about 24 bytes a record: more than the 8 KiB buffer
		name := fmt.Sprintf("entry-with-a-longish-name-%03d", i)
		want = append(want, name)
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(want)
	p := NewPath(dir)
	var r DirReader
	var got []string
	if err := r.Each(p, func(name []byte) { got = append(got, string(name)) }); err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("Each named %d entries, want %d (no . or ..): %q", len(got), len(want), got[:min(5, len(got))])
	}
	n := 0
	count := func(name []byte) { n++ }
	if allocs := testing.AllocsPerRun(10, func() {
		if err := r.Each(p, count); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Errorf("reading the directory again allocates %.0f times, want none", allocs)
	}
	if err := r.Each(NewPath(filepath.Join(dir, "missing")), count); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Each of a missing directory: %v, want one that is ErrNotExist", err)
	}
}

// TestReadSmall reads a file into a buffer.
func TestReadSmall(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, []byte("123 456\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var buf [64]byte
	n, err := ReadSmall(NewPath(f), buf[:])
	if err != nil || string(buf[:n]) != "123 456\n" {
		t.Errorf("ReadSmall = %q, %v", buf[:n], err)
	}
}
