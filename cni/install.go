package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// PluginConfig is mantlet's entry in a CNI configuration list.
type PluginConfig struct {
	// Socket is the agent's socket (default DefaultSocket).
	Socket string `json:"agentSocket,omitempty"`
	// ExcludeNamespaces start without the agent (fail open for them
	// only); nil means DefaultExcludedNamespaces.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// TimeoutSeconds bounds the wait for the agent's answer (default
	// DefaultTimeout).
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
}

// ErrNoNetwork is returned by Install when the CNI configuration folder
// holds no network yet (the cluster's network plugin has not written its
// configuration): there is nothing to chain to, try again later.
var ErrNoNetwork = errors.New("no CNI network configuration yet")

// InstallBinary copies the plugin binary src into binDir as PluginType,
// whole or not at all; a binary already identical is left alone.
func InstallBinary(src, binDir string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("cni: read plugin binary: %w", err)
	}
	dst := filepath.Join(binDir, PluginType)
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, b) {
		return nil
	}
	return writeAtomic(dst, b, 0o755)
}

// Network returns the file the container runtime takes the pod network
// from: the first CNI configuration of confDir in name order (as libcni
// loads them), or ErrNoNetwork.
func Network(confDir string) (string, error) {
	ents, err := os.ReadDir(confDir)
	if err != nil {
		return "", fmt.Errorf("cni: read %s: %w", confDir, err)
	}
	var names []string
	for _, e := range ents {
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			if e.Type().IsRegular() {
				names = append(names, e.Name())
			}
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("cni: %s: %w", confDir, ErrNoNetwork)
	}
	sort.Strings(names)
	return filepath.Join(confDir, names[0]), nil
}

// Install makes mantlet's plugin the last of the plugins of confDir's
// network (see Network), configured as pc. It reports whether it changed
// the file. A single-plugin .conf cannot be chained: its error says so.
func Install(confDir string, pc PluginConfig) (path string, changed bool, err error) {
	path, err = Network(confDir)
	if err != nil {
		return "", false, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return path, false, fmt.Errorf("cni: %w", err)
	}
	list, err := decodeList(path, b)
	if err != nil {
		return path, false, err
	}
	entry := map[string]any{"type": PluginType}
	raw, _ := json.Marshal(pc)
	_ = json.Unmarshal(raw, &entry)
	plugins := withoutOurs(list["plugins"].([]any))
	plugins = append(plugins, entry)
	list["plugins"] = plugins
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return path, false, fmt.Errorf("cni: encode %s: %w", path, err)
	}
	out = append(out, '\n')
	if sameJSON(b, out) {
		return path, false, nil
	}
	if err := writeAtomic(path, out, 0o644); err != nil {
		return path, false, err
	}
	return path, true, nil
}

// Uninstall removes mantlet's plugin from every configuration list of
// confDir, and its binary from binDir (when binDir is not empty). It
// returns the files it changed.
func Uninstall(confDir, binDir string) ([]string, error) {
	ents, err := os.ReadDir(confDir)
	if err != nil {
		return nil, fmt.Errorf("cni: read %s: %w", confDir, err)
	}
	var changed []string
	var errs []error
	for _, e := range ents {
		if filepath.Ext(e.Name()) != ".conflist" && filepath.Ext(e.Name()) != ".json" {
			continue
		}
		path := filepath.Join(confDir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("cni: %w", err))
			continue
		}
		list, err := decodeList(path, b)
		if err != nil {
			continue // not a list: not ours to touch
		}
		plugins := list["plugins"].([]any)
		kept := withoutOurs(plugins)
		if len(kept) == len(plugins) {
			continue
		}
		list["plugins"] = kept
		out, err := json.MarshalIndent(list, "", "  ")
		if err == nil {
			err = writeAtomic(path, append(out, '\n'), 0o644)
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		changed = append(changed, path)
	}
	if binDir != "" {
		if err := os.Remove(filepath.Join(binDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("cni: remove plugin binary: %w", err))
		}
	}
	return changed, errors.Join(errs...)
}

// decodeList decodes a CNI configuration list.
func decodeList(path string, b []byte) (map[string]any, error) {
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("cni: decode %s: %w", path, err)
	}
	if _, ok := list["plugins"].([]any); !ok {
		return nil, fmt.Errorf("cni: %s is a single-plugin configuration (no \"plugins\" list): mantlet's plugin can only be chained to a .conflist; convert it, or let the network plugin write one", path)
	}
	return list, nil
}

// withoutOurs drops mantlet's entries from a plugins list.
func withoutOurs(plugins []any) []any {
	return slices.DeleteFunc(slices.Clone(plugins), func(p any) bool {
		m, ok := p.(map[string]any)
		return ok && m["type"] == PluginType
	})
}

// sameJSON reports whether a and b hold the same JSON value.
func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// writeAtomic writes b to path through a temporary file in the same
// folder and a rename, so that a reader (the runtime) never sees half.
func writeAtomic(path string, b []byte, mode os.FileMode) error {
	dir, base := filepath.Split(path)
	tmp, err := os.CreateTemp(dir, "."+strings.TrimPrefix(base, ".")+".tmp-*")
	if err != nil {
		return fmt.Errorf("cni: write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("cni: write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("cni: write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cni: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("cni: write %s: %w", path, err)
	}
	return nil
}
