package bpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Cleanup removes the data path pinned in pinDir: it detaches every
// program (pods, uplinks, sk_lookup), removes the policy routing rule and
// route from the calling thread's network namespace, and removes the
// pins. The rule and route stay when another data path pinned next to
// pinDir uses them in the same namespace (they are the same rule). It
// refuses, touching nothing, when the data path belongs to another
// network namespace than the caller's, and fails with ErrLocked while an
// agent holds the pin directory. A missing pinDir is not an error: the
// report says nothing was found, and names the data paths pinned for this
// namespace under the same parent. net.ipv4.ip_forward is left on.
func Cleanup(ctx context.Context, pinDir string) (CleanupReport, error) {
	rep := CleanupReport{PinDir: pinDir}
	if pinDir == "" || !filepath.IsAbs(pinDir) {
		return rep, fmt.Errorf("bpf: cleanup: pin dir %q must be an absolute path", pinDir)
	}
	ns, err := netns.Get()
	if err != nil {
		return rep, fmt.Errorf("bpf: cleanup: open the current network namespace: %w", err)
	}
	defer ns.Close()
	ino, err := nsInode(ns)
	if err != nil {
		return rep, err
	}
	if _, err := os.Stat(pinDir); errors.Is(err, fs.ErrNotExist) {
		for _, s := range siblings(pinDir, false) {
			if s.nsInode == ino {
				rep.Others = append(rep.Others, s.dir)
			}
		}
		return rep, nil
	} else if err != nil {
		return rep, fmt.Errorf("bpf: cleanup: %w", err)
	}
	unlock, err := lockParent(ctx, pinDir)
	if err != nil {
		return rep, err
	}
	defer unlock()
	lock, err := lockDir(pinDir)
	if err != nil {
		return rep, err
	}
	defer lock.Close()
	nl, err := netlink.NewHandle()
	if err != nil {
		return rep, fmt.Errorf("bpf: cleanup: netlink: %w", err)
	}
	defer nl.Close()
	if pinned := pinnedNetns(pinDir); pinned != 0 && pinned != ino {
		return rep, fmt.Errorf("bpf: cleanup: the data path in %s is attached to another network namespace (inode %d) than this process's (inode %d): run the cleanup in the node's namespace, e.g. with nsenter --net=<the node's namespace file>; nothing was removed", pinDir, pinned, ino)
	}
	return cleanupLocked(nl, ino, pinDir)
}

// cleanupLocked is Cleanup once the caller holds the parent's lock and
// pinDir's, with nl and ino in the data path's namespace.
func cleanupLocked(nl *netlink.Handle, ino uint64, pinDir string) (CleanupReport, error) {
	rep := CleanupReport{PinDir: pinDir, Found: true}
	var errs []error
	entries, err := os.ReadDir(filepath.Join(pinDir, linksDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: cleanup: %w", err))
	}
	for _, e := range entries {
		pin := filepath.Join(pinDir, linksDir, e.Name())
		what := e.Name()
		key, clsact, ok := parsePinName(e.Name())
		if ok {
			what = fmt.Sprintf("%s on ifindex %d", key.role, key.ifindex)
		}
		if ok && clsact {
			err := nl.FilterDel(clsactFilter(key, 0))
			switch {
			case err == nil:
				rep.Detached = append(rep.Detached, what)
			case !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL):
				errs = append(errs, fmt.Errorf("bpf: cleanup: delete the clsact filter %s on ifindex %d: %w", key.role, key.ifindex, err))
			}
			continue
		}
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("bpf: cleanup: load %s: %w", pin, err))
			continue
		}
		switch err := l.Detach(); {
		case err == nil:
			rep.Detached = append(rep.Detached, what)
		case !errors.Is(err, unix.ENOLINK):
			errs = append(errs, fmt.Errorf("bpf: cleanup: detach %s: %w", pin, err))
		}
		l.Close()
	}
	if s, err := readPinnedSettings(pinDir); err == nil {
		shared := ""
		for _, o := range siblings(pinDir, true) {
			if o.nsInode == ino && o.settings.sameRouting(s) {
				shared = o.dir
				break
			}
		}
		if shared != "" {
			rep.Rule = "kept: the data path pinned at " + shared + " uses it"
			rep.Route = rep.Rule
		} else {
			var err error
			rep.Rule, rep.Route, err = removeRouting(nl, s)
			if err != nil {
				errs = append(errs, err)
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: cleanup: read the routing settings: %w", err))
	}
	if err := os.RemoveAll(pinDir); err != nil {
		errs = append(errs, fmt.Errorf("bpf: cleanup: remove pins: %w", err))
	} else {
		rep.PinsRemoved = true
	}
	return rep, errors.Join(errs...)
}

// readPinnedSettings reads the config map pinned in pinDir. It reads the
// leading fields only, so the pins of older versions (with a shorter
// struct settings) can be cleaned up too.
func readPinnedSettings(pinDir string) (mantletSettings, error) {
	var s mantletSettings
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, configMapPin), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return s, err
	}
	defer m.Close()
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), &raw); err != nil {
		return s, err
	}
	fields := []*uint32{&s.RedirectMark, &s.MarkMask, &s.ZtunnelMark, &s.Flags, &s.RouteTable, &s.RulePriority, &s.PassMark}
	for i, f := range fields {
		if len(raw) >= 4*(i+1) {
			*f = binary.NativeEndian.Uint32(raw[4*i:])
		}
	}
	return s, nil
}

func (s mantletSettings) sameRouting(o mantletSettings) bool {
	return s.RouteTable == o.RouteTable && s.RulePriority == o.RulePriority && s.RedirectMark == o.RedirectMark && s.MarkMask == o.MarkMask
}

// pinnedNetns returns the inode of the network namespace the sk_lookup
// link pinned in pinDir is attached to; 0 when there is none or its
// namespace is gone.
func pinnedNetns(pinDir string) uint64 {
	l, err := link.LoadPinnedLink(filepath.Join(pinDir, linksDir, skLookupPin), nil)
	if err != nil {
		return 0
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil || info.NetNs() == nil {
		return 0
	}
	return uint64(info.NetNs().NetnsInode)
}

// sibling is another data path pinned under the same parent directory.
type sibling struct {
	dir      string
	nsInode  uint64 // its network namespace; 0 if unknown or gone
	settings mantletSettings
	live     bool // an agent holds it
}

// siblings lists the data paths pinned next to pinDir (not pinDir itself,
// not staging directories). With probeLive it tries each one's lock to
// tell whether an agent holds it; the caller must then hold the parent's
// lock, so that the probe never races an Open.
func siblings(pinDir string, probeLive bool) []sibling {
	parent := filepath.Dir(pinDir)
	entries, err := os.ReadDir(parent)
	if err != nil {
		return nil
	}
	var out []sibling
	for _, e := range entries {
		dir := filepath.Join(parent, e.Name())
		if !e.IsDir() || dir == pinDir || strings.HasPrefix(e.Name(), stagePrefix) {
			continue
		}
		s, err := readPinnedSettings(dir)
		if err != nil {
			continue // not a data path
		}
		sib := sibling{dir: dir, nsInode: pinnedNetns(dir), settings: s}
		if probeLive {
			if f, err := lockDir(dir); err == nil {
				f.Close()
			} else {
				sib.live = errors.Is(err, ErrLocked)
			}
		}
		out = append(out, sib)
	}
	return out
}
