package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// state is what the state file records: enough to rebuild the layout in
// another process.
type state struct {
	Prefix  string    `json:"prefix"`
	Created time.Time `json:"created"`
	// PID is the process that built the testbed.
	PID  int  `json:"pid"`
	Spec Spec `json:"spec"`
}

// Info describes a testbed found in the state directory.
type Info struct {
	Prefix  string
	Created time.Time
	// PID is the process that built it (it may have exited: testbeds
	// outlive `mantlet testbed up`).
	PID   int
	Nodes int
	Pods  int
	// Namespaces counts the testbed's namespaces that exist now.
	Namespaces int
	// Err is set when the state file could not be read.
	Err error
}

func resolveOptions(opts []Option) (options, error) {
	o := options{stateDir: DefaultStateDir}
	for _, opt := range opts {
		opt(&o)
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	if o.prefix == "" {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return o, fmt.Errorf("testbed: random prefix: %w", err)
		}
		o.prefix = "tb" + hex.EncodeToString(b[:])
	}
	return o, ValidatePrefix(o.prefix)
}

func stateFile(dir, prefix string) string { return filepath.Join(dir, prefix+".json") }

// claimState creates the state file, failing if the prefix is taken; it is
// written before anything else is made, so that a crash at any point leaves
// a record that `testbed down` can act on.
func claimState(dir string, st state) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("testbed: state directory: %w", err)
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("testbed: encode state: %w", err)
	}
	path := stateFile(dir, st.Prefix)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("testbed: prefix %q is in use (state file %s exists; run 'mantlet testbed down --prefix %s')", st.Prefix, path, st.Prefix)
	}
	if err != nil {
		return fmt.Errorf("testbed: create state file: %w", err)
	}
	_, werr := f.Write(append(b, '\n'))
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		return fmt.Errorf("testbed: write state file %s: %w", path, err)
	}
	return nil
}

func readState(dir, prefix string) (state, error) {
	var st state
	b, err := os.ReadFile(stateFile(dir, prefix))
	if err != nil {
		return st, fmt.Errorf("testbed: read state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("testbed: state file %s: %w", stateFile(dir, prefix), err)
	}
	if st.Prefix != prefix {
		return st, fmt.Errorf("testbed: state file %s names prefix %q", stateFile(dir, prefix), st.Prefix)
	}
	return st, nil
}

// existingNamespaces lists the named network namespaces that belong to the
// testbed with prefix, whatever its state file says.
func existingNamespaces(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("testbed: list namespaces: %w", err)
	}
	var names []string
	for _, e := range entries {
		if ownsNamespace(prefix, e.Name()) {
			names = append(names, filepath.Join(netnsDir, e.Name()))
		}
	}
	return names, nil
}

// ownsNamespace reports whether a namespace name belongs to the testbed
// with prefix. Prefixes hold no '-', so "<prefix>-" is unambiguous.
func ownsNamespace(prefix, name string) bool {
	rest, ok := strings.CutPrefix(name, prefix+"-")
	if !ok {
		return false
	}
	return rest == "underlay" || rest == controlPlaneKind || strings.HasPrefix(rest, "node-") || strings.HasPrefix(rest, "pod-")
}

// List describes the testbeds recorded in the state directory (default
// DefaultStateDir; only WithStateDir matters among opts).
func List(opts ...Option) ([]Info, error) {
	o := options{stateDir: DefaultStateDir}
	for _, opt := range opts {
		opt(&o)
	}
	entries, err := os.ReadDir(o.stateDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("testbed: list state directory: %w", err)
	}
	var infos []Info
	for _, e := range entries {
		prefix, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || ValidatePrefix(prefix) != nil {
			continue
		}
		info := Info{Prefix: prefix}
		st, err := readState(o.stateDir, prefix)
		if err != nil {
			info.Err = err
		} else {
			info.Created, info.PID, info.Nodes = st.Created, st.PID, len(st.Spec.Nodes)
			for _, n := range st.Spec.Nodes {
				info.Pods += len(n.Pods)
			}
		}
		nss, err := existingNamespaces(prefix)
		if err != nil {
			return nil, err
		}
		info.Namespaces = len(nss)
		infos = append(infos, info)
	}
	slices.SortFunc(infos, func(a, b Info) int { return a.Created.Compare(b.Created) })
	return infos, nil
}
