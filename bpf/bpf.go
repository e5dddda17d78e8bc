package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"time"
)

// Slot names one of the ztunnel's listeners in the listeners SOCKMAP.
type Slot uint32

// The listener slots. An empty slot makes the sk_lookup program drop the
// connections it would have handed to it (fail closed).
const (
	// Outbound receives connections captured from local pods (:15001).
	Outbound Slot = 0
	// InboundPlain is reserved for plaintext connections to local pods
	// (:15006); nothing is steered to it unless Config.CaptureInboundPlain.
	InboundPlain Slot = 1
	// HBONE receives mutual-TLS tunnels addressed to local pods (:15008).
	HBONE Slot = 2

	numSlots = 3
)

// Slots lists every slot, in order.
func Slots() []Slot { return []Slot{Outbound, InboundPlain, HBONE} }

func (s Slot) String() string {
	switch s {
	case Outbound:
		return "outbound"
	case InboundPlain:
		return "inbound-plain"
	case HBONE:
		return "hbone"
	}
	return fmt.Sprintf("slot(%d)", uint32(s))
}

// Port is the ztunnel port that conventionally serves the slot.
func (s Slot) Port() uint16 {
	switch s {
	case Outbound:
		return 15001
	case InboundPlain:
		return 15006
	case HBONE:
		return 15008
	}
	return 0
}

// Defaults for Config. The marks stay clear of the bits kube-proxy
// (0x4000, 0x8000), Calico (0xffff0000) and Cilium (0x0f00) use.
const (
	DefaultPinRoot      = "/sys/fs/bpf/mantlet"
	DefaultRedirectMark = 0x1000
	DefaultMarkMask     = 0x1000
	DefaultZtunnelMark  = 0x2000
	DefaultPassMark     = 0x0080
	DefaultRouteTable   = 15001
	DefaultRulePriority = 1500
)

// Config describes the data path of one node. Open validates it.
type Config struct {
	// PinDir holds the pinned maps and links of this node, on a bpf
	// filesystem: DefaultPinRoot/<node>. It must be absolute.
	PinDir string
	// RedirectMark is the fwmark the tc programs set on packets that must
	// be delivered locally (to the ztunnel or to a socket it owns).
	RedirectMark uint32
	// MarkMask selects the bits of the fwmark that RedirectMark owns.
	// RedirectMark must lie inside it.
	MarkMask uint32
	// RouteTable is the policy routing table that gets `local 0.0.0.0/0
	// dev lo`. Not 0 and not one of the kernel's tables (253-255).
	RouteTable int
	// RulePriority is the priority of the `fwmark RedirectMark/MarkMask
	// lookup RouteTable` rule, between 1 and 32765.
	RulePriority int
	// ZtunnelMark is the SO_MARK of the ztunnel's sockets. With STRICT, a
	// SYN towards a pod passes only if it carries all of these bits (or
	// comes from a node IP). Must be non-zero and must not match the
	// redirect rule.
	ZtunnelMark uint32
	// PassMark is the fwmark bit pod_ingress sets on the packets of an
	// enrolled pod that it lets leave untouched (excluded destinations,
	// replies of flows it does not capture). uplink_egress drops an
	// enrolled pod's IPv4 packet that carries neither it nor ZtunnelMark:
	// it escaped a detached pod_ingress. Must be non-zero and share no bit
	// with MarkMask or ZtunnelMark.
	PassMark uint32
	// NodeIPs are the node's own addresses: never captured, and allowed
	// through STRICT (kubelet probes). IPv6 addresses are ignored for now.
	NodeIPs []netip.Addr
	// ExcludeCIDRs are destination prefixes that are never captured.
	// IPv6 prefixes are ignored for now.
	ExcludeCIDRs []netip.Prefix
	// ExcludePorts are destination ports that are never captured.
	ExcludePorts []uint16
	// CaptureInboundPlain also captures plaintext connections from other
	// nodes to local pods on ports other than 15008 and hands them to the
	// InboundPlain slot (the ztunnel then applies policy to them, and to
	// STRICT pods refuses them with an event).
	CaptureInboundPlain bool
	// CaptureLocalPlain also hands plaintext connections from this node's
	// unmeshed pods to PERMISSIVE enrolled pods to the InboundPlain slot:
	// pod_egress turns them around into lo's ingress. It needs reverse
	// path filtering on lo to be off or loose (net.ipv4.conf.{all,lo}.
	// rp_filter 0 or 2); Open leaves it off, with a warning, when it is
	// strict.
	CaptureLocalPlain bool
}

// Limits of the maps, mirrored from bpf/mantlet.h.
const (
	maxNodeIPs      = 64
	maxExcludeCIDRs = 256
	maxExcludePorts = 64
)

// DefaultConfig returns the defaults for the node named node. The pin
// directory is DefaultPinRoot/<node> with dots replaced by '-' (bpffs
// refuses names with a dot).
func DefaultConfig(node string) Config {
	return Config{
		PinDir:       filepath.Join(DefaultPinRoot, strings.ReplaceAll(node, ".", "-")),
		RedirectMark: DefaultRedirectMark,
		MarkMask:     DefaultMarkMask,
		RouteTable:   DefaultRouteTable,
		RulePriority: DefaultRulePriority,
		ZtunnelMark:  DefaultZtunnelMark,
		PassMark:     DefaultPassMark,
	}
}

// Validate reports the first thing wrong with c.
func (c Config) Validate() error {
	switch {
	case c.PinDir == "" || !filepath.IsAbs(c.PinDir) || filepath.Clean(c.PinDir) != c.PinDir || c.PinDir == "/":
		return fmt.Errorf("bpf: config: PinDir %q must be a clean absolute path below a bpf filesystem", c.PinDir)
	case strings.Contains(filepath.Base(c.PinDir), "."):
		return fmt.Errorf("bpf: config: the last element of PinDir %q must not contain '.' (bpffs refuses it)", c.PinDir)
	case strings.HasPrefix(filepath.Base(c.PinDir), "_"):
		return fmt.Errorf("bpf: config: the last element of PinDir %q must not start with '_' (reserved for staging)", c.PinDir)
	case c.RedirectMark == 0 || c.MarkMask == 0:
		return fmt.Errorf("bpf: config: RedirectMark %#x and MarkMask %#x must be non-zero", c.RedirectMark, c.MarkMask)
	case c.RedirectMark&^c.MarkMask != 0:
		return fmt.Errorf("bpf: config: RedirectMark %#x has bits outside MarkMask %#x", c.RedirectMark, c.MarkMask)
	case c.ZtunnelMark == 0:
		return errors.New("bpf: config: ZtunnelMark must be non-zero (STRICT needs it to recognise the ztunnel)")
	case c.ZtunnelMark&c.MarkMask == c.RedirectMark:
		return fmt.Errorf("bpf: config: ZtunnelMark %#x matches the redirect rule %#x/%#x: the ztunnel's own packets would loop back", c.ZtunnelMark, c.RedirectMark, c.MarkMask)
	case c.PassMark == 0:
		return errors.New("bpf: config: PassMark must be non-zero (the uplink guard needs it)")
	case c.PassMark&(c.MarkMask|c.ZtunnelMark) != 0:
		return fmt.Errorf("bpf: config: PassMark %#x shares bits with the redirect mask %#x or the ztunnel mark %#x", c.PassMark, c.MarkMask, c.ZtunnelMark)
	case c.RouteTable <= 0 || c.RouteTable >= 253 && c.RouteTable <= 255 || int64(c.RouteTable) > 0xffffffff:
		return fmt.Errorf("bpf: config: RouteTable %d must be a free table id (not 0, 253, 254, 255)", c.RouteTable)
	case c.RulePriority < 1 || c.RulePriority > 32765:
		return fmt.Errorf("bpf: config: RulePriority %d must be between 1 and 32765", c.RulePriority)
	case len(c.NodeIPs) > maxNodeIPs:
		return fmt.Errorf("bpf: config: %d NodeIPs, at most %d", len(c.NodeIPs), maxNodeIPs)
	case len(c.ExcludeCIDRs) > maxExcludeCIDRs:
		return fmt.Errorf("bpf: config: %d ExcludeCIDRs, at most %d", len(c.ExcludeCIDRs), maxExcludeCIDRs)
	case len(c.ExcludePorts) > maxExcludePorts:
		return fmt.Errorf("bpf: config: %d ExcludePorts, at most %d", len(c.ExcludePorts), maxExcludePorts)
	}
	for _, a := range c.NodeIPs {
		if !a.IsValid() {
			return errors.New("bpf: config: NodeIPs holds an invalid address")
		}
	}
	for _, p := range c.ExcludeCIDRs {
		if !p.IsValid() {
			return errors.New("bpf: config: ExcludeCIDRs holds an invalid prefix")
		}
	}
	for _, p := range c.ExcludePorts {
		if p == 0 {
			return errors.New("bpf: config: ExcludePorts holds port 0")
		}
	}
	return nil
}

// Pod is a local pod to enroll: the host side of its veth and its
// addresses.
type Pod struct {
	// HostIfindex is the ifindex of the host side of the pod's veth in the
	// node's namespace. Either it or HostIfName is required.
	HostIfindex int
	// HostIfName is the name of the host side of the pod's veth; used when
	// HostIfindex is 0.
	HostIfName string
	// IPs are the pod's addresses: the only source addresses its veth
	// accepts. At least one IPv4 address; IPv6 addresses are ignored for
	// now (IPv6 traffic is neither captured nor filtered).
	IPs []netip.Addr
	// Strict drops new connections towards the pod that the ztunnel did
	// not make, except from the node's own addresses.
	Strict bool
}

// Counters are the data path's counters, summed over CPUs. They only grow
// (until the pins are removed). The fields mirror struct counter_set of
// mantlet.h in order (a test checks it); the event tag is the counter's
// name in metrics and the admin API (Events).
type Counters struct {
	// Redirected counts SYNs from pods captured for the ztunnel.
	Redirected uint64 `event:"redirected"`
	// UplinkRedirected counts SYNs from other nodes to local pods captured
	// for the ztunnel (HBONE, and inbound plaintext).
	UplinkRedirected uint64 `event:"uplink_redirected"`
	// Assigned counts packets the tc programs handed to the local socket
	// that owns their flow.
	Assigned uint64 `event:"assigned"`
	// AssignFailed counts packets dropped because that hand-over was
	// refused.
	AssignFailed uint64 `event:"assign_failed"`
	// SpoofDrops counts packets from pods with a source address that is
	// not the pod's.
	SpoofDrops uint64 `event:"spoof_dropped"`
	// StrictDrops counts SYNs towards STRICT pods the ztunnel did not send.
	StrictDrops uint64 `event:"strict_dropped"`
	// NoListener counts captured connections dropped because the
	// listener's slot was empty (the ztunnel was away): fail closed.
	NoListener uint64 `event:"no_listener_dropped"`
	// Excluded counts SYNs from pods left alone because their destination
	// is excluded.
	Excluded uint64 `event:"excluded"`
	// LookupOutbound, LookupInboundPlain and LookupHBONE count connections
	// handed to each listener.
	LookupOutbound     uint64 `event:"lookup_outbound"`
	LookupInboundPlain uint64 `event:"lookup_inbound_plaintext"`
	LookupHBONE        uint64 `event:"lookup_hbone"`
	// LookupFailed counts connections dropped because the kernel refused
	// the listener.
	LookupFailed uint64 `event:"lookup_failed"`
	// LocalPlainRedirected counts plaintext SYNs from unmeshed pods of
	// this node to PERMISSIVE pods turned to the ztunnel.
	LocalPlainRedirected uint64 `event:"local_plain_redirected"`
	// RouteDrops counts captured SYNs dropped because policy routing would
	// not have delivered them to the ztunnel (the rule or the route of the
	// capture table is missing, lo is down): fail closed.
	RouteDrops uint64 `event:"route_dropped"`
	// LeakDrops counts packets of enrolled pods dropped on an uplink
	// because neither pod_ingress nor the ztunnel had handled them (a
	// detached or bypassed program): fail closed.
	LeakDrops uint64 `event:"leak_dropped"`
	// OrphanDrops counts later packets of a pod's flow that the ztunnel
	// carried, dropped by pod_ingress because the ztunnel's end of the
	// flow is gone (the agent restarted or crashed while the flow was
	// open): fail closed instead of the rest of the flow in clear.
	OrphanDrops uint64 `event:"orphan_dropped"`
}

// Event is one counter of Counters by its metric name.
type Event struct {
	Name  string
	Value uint64
}

// Events returns every counter with its name, in the order of Counters.
func (c Counters) Events() []Event {
	v := reflect.ValueOf(c)
	t := v.Type()
	out := make([]Event, t.NumField())
	for i := range out {
		out[i] = Event{t.Field(i).Tag.Get("event"), v.Field(i).Uint()}
	}
	return out
}

// Status is what /healthz/ready needs to know about the data path.
type Status struct {
	// SkLookupAttached reports whether the sk_lookup program is attached
	// to the node's namespace.
	SkLookupAttached bool
	// Listeners are the slots that hold a listening socket.
	Listeners []Slot
	// Problems are the other pieces of kernel state that are missing
	// (Datapath.Check), until Repair mends them.
	Problems []Problem
	// Pods are the ifindexes of enrolled pods' veths with programs
	// attached; Uplinks those of uplinks.
	Pods    []int
	Uplinks []int
}

// HasListener reports whether slot holds a listener.
func (s Status) HasListener(slot Slot) bool {
	for _, l := range s.Listeners {
		if l == slot {
			return true
		}
	}
	return false
}

// Ready reports whether captured traffic can flow: sk_lookup attached,
// listeners in the Outbound and HBONE slots, and no other problem.
func (s Status) Ready() bool {
	return s.SkLookupAttached && s.HasListener(Outbound) && s.HasListener(HBONE) && len(s.Problems) == 0
}

// String says why the data path is not ready, or that it is.
func (s Status) String() string {
	var missing []string
	if !s.SkLookupAttached {
		missing = append(missing, "sk_lookup program not attached")
	}
	for _, slot := range []Slot{Outbound, HBONE} {
		if !s.HasListener(slot) {
			missing = append(missing, fmt.Sprintf("no %s listener (:%d) in the SOCKMAP", slot, slot.Port()))
		}
	}
	for _, p := range s.Problems {
		missing = append(missing, p.Detail)
	}
	if len(missing) > 0 {
		return "not ready: " + strings.Join(missing, "; ")
	}
	return fmt.Sprintf("ready: %d pods, %d uplinks", len(s.Pods), len(s.Uplinks))
}

// DefaultWatchInterval is how often Watch checks the data path without a
// netlink notification: the only way to notice a detached program or a
// removed pin.
const DefaultWatchInterval = 250 * time.Millisecond

// Fault names a kind of kernel state the data path depends on. The set is
// closed: it labels the repairs metric.
type Fault string

// The faults Check reports.
const (
	// FaultRule: the fwmark rule that delivers captured packets locally.
	FaultRule Fault = "routing-rule"
	// FaultRoute: the capture table's `local 0.0.0.0/0 dev lo`.
	FaultRoute Fault = "capture-route"
	// FaultLoopback: lo is down (the capture route needs it).
	FaultLoopback Fault = "loopback"
	// FaultSkLookup: the sk_lookup program is not attached to the node's
	// namespace.
	FaultSkLookup Fault = "sk-lookup"
	// FaultAttachment: a tc program is not attached to its interface.
	FaultAttachment Fault = "attachment"
	// FaultPin: a pin (map, link or directory) is missing from bpffs.
	FaultPin Fault = "pin"
)

// Faults lists every Fault.
func Faults() []Fault {
	return []Fault{FaultRule, FaultRoute, FaultLoopback, FaultSkLookup, FaultAttachment, FaultPin}
}

// Problem is a piece of the data path's kernel state that is missing.
type Problem struct {
	Fault  Fault
	Detail string // what exactly, for people
}

// CleanupReport says what Cleanup found and what it did.
type CleanupReport struct {
	// PinDir is the pin directory it was asked to clean.
	PinDir string
	// Found: a data path was pinned there. When false nothing was done,
	// and Others lists the data paths pinned next to it for the same
	// network namespace (the pin dir the caller probably meant).
	Found  bool
	Others []string
	// Detached lists the programs it detached ("pod-ingress on ifindex
	// 5", "sk_lookup").
	Detached []string
	// Rule and Route say what became of the routing rule and the capture
	// route: "removed", "not found", "not removed" (see the error) or
	// "kept: ..." when another data path of the namespace uses them.
	Rule, Route string
	// PinsRemoved: the pin directory is gone.
	PinsRemoved bool
}

// String says in one line what Cleanup did.
func (r CleanupReport) String() string {
	if !r.Found {
		s := "nothing pinned at " + r.PinDir + ": nothing removed"
		if len(r.Others) > 0 {
			s += "; data paths pinned for this network namespace: " + strings.Join(r.Others, ", ") + " (name one with --pin-dir)"
		}
		return s
	}
	pins := "pins removed"
	if !r.PinsRemoved {
		pins = "pins NOT removed"
	}
	return fmt.Sprintf("%s: %d programs detached, routing rule %s, capture route %s, %s", r.PinDir, len(r.Detached), r.Rule, r.Route, pins)
}

// ErrNamespaceInUse is returned by Open when a running agent's data path,
// pinned in another directory, is attached to the same network namespace.
var ErrNamespaceInUse = errors.New("bpf: another agent runs in this network namespace")

// ErrLocked is returned by Open and Cleanup when another process (another
// agent) holds the pin directory.
var ErrLocked = errors.New("bpf: pin directory is in use by another agent")

// ipv4Only returns the IPv4 addresses of addrs, unmapped.
func ipv4Only(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		if a.Is4() {
			out = append(out, a)
		}
	}
	return out
}
