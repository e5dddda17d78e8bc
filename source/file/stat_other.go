//go:build !linux

package file

import "os"

// fileID identifies a file by the FileInfo that os.SameFile compares.
type fileID struct{ fi os.FileInfo }

func (a fileID) same(b fileID) bool { return a.fi != nil && b.fi != nil && os.SameFile(a.fi, b.fi) }

// statVersion stats path.
func statVersion(path string) fileVersion {
	fi, err := os.Stat(path)
	if err != nil {
		return fileVersion{err: err.Error()}
	}
	return versionOf(fi)
}

// versionOf is the version fi describes.
func versionOf(fi os.FileInfo) fileVersion {
	return fileVersion{found: true, size: fi.Size(), mtime: fi.ModTime(), id: fileID{fi}}
}
