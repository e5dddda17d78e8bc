// Package workload holds the mesh's view of the cluster: workloads (pods),
// services and nodes, as one immutable Snapshot. Writers (the Kubernetes
// watcher, the standalone file watcher, tests) build a new Snapshot and
// replace the old one whole in a Store; readers (the ztunnel's hot path)
// load it without locks.
package workload

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity"
)

// Workload is one pod as the mesh sees it.
type Workload struct {
	// UID is the pod's Kubernetes UID, or any unique string in standalone
	// mode.
	UID string
	// Name and Namespace name the pod.
	Name      string
	Namespace string
	// ServiceAccount is the pod's service account; with Namespace it makes
	// the pod's SPIFFE identity.
	ServiceAccount string
	// Labels are the pod's labels (used by service selectors and policy).
	Labels map[string]string
	// Node is the name of the node the pod runs on, NodeIP that node's
	// address on the underlay.
	Node   string
	NodeIP netip.Addr
	// IPs are the pod's addresses; the first is its primary.
	IPs []netip.Addr
	// Enrolled is true when the pod is in the mesh: its namespace opted in
	// and the pod did not opt out.
	Enrolled bool
	// TrustDomain, when set, is the trust domain of the pod's identity: a
	// federated domain other than the reader's own (the pod or its node
	// is annotated mantlet.io/trust-domain). Zero: the reader's own.
	TrustDomain spiffeid.TrustDomain
}

// ID returns the workload's SPIFFE ID:
// spiffe://<trust domain>/ns/<namespace>/sa/<service account>, in the
// workload's own TrustDomain when it has one, else in td (the reader's).
// The ztunnel asks for it on every flow: IDs are made once and shared
// (ids), so flows do not leave thousands of copies of the same string
// behind in the flow records, each pinning the heap page it was
// allocated on.
func (w *Workload) ID(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	sa := w.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	if !w.TrustDomain.IsZero() {
		td = w.TrustDomain
	}
	k := idKey{td: td, ns: w.Namespace, sa: sa}
	ids.mu.Lock()
	id, ok := ids.m[k]
	ids.mu.Unlock()
	if ok {
		return id, nil
	}
	id, err := identity.WorkloadID(td, w.Namespace, sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload %s/%s: %w", w.Namespace, w.Name, err)
	}
	ids.mu.Lock()
	if len(ids.m) >= idCacheSize {
		clear(ids.m) // bounded: a cluster with more identities makes some twice
	}
	ids.m[k] = id
	ids.mu.Unlock()
	return id, nil
}

// idCacheSize bounds the identities that Workload.ID keeps made.
const idCacheSize = 4096

type idKey struct {
	td     spiffeid.TrustDomain
	ns, sa string
}

// ids are the identities Workload.ID made, at most idCacheSize.
var ids = struct {
	mu sync.Mutex
	m  map[idKey]spiffeid.ID
}{m: make(map[idKey]spiffeid.ID)}

// String names the workload as namespace/name.
func (w *Workload) String() string { return w.Namespace + "/" + w.Name }

// ServicePort is one port of a service.
type ServicePort struct {
	Name string
	// Port is the port on the service's virtual IPs.
	Port uint16
	// TargetPort is the port on the endpoints (Port when zero).
	TargetPort uint16
}

// Service is a Kubernetes-style service: virtual IPs whose ports lead to a
// set of workloads.
type Service struct {
	Name      string
	Namespace string
	VIPs      []netip.Addr
	Ports     []ServicePort
	// Endpoints are the UIDs of the workloads behind the service.
	Endpoints []string
}

// String names the service as its cluster-local host name.
func (s *Service) String() string { return s.Name + "." + s.Namespace + ".svc" }

// Node is one node of the cluster.
type Node struct {
	Name string
	// IP is the node's address on the underlay (Kubernetes InternalIP).
	IP netip.Addr
	// TrustDomain, when set, is the trust domain of the node's pods (its
	// mantlet.io/trust-domain annotation); zero: the reader's own.
	TrustDomain spiffeid.TrustDomain
}

// Snapshot is an immutable view of the cluster. Build it with New; never
// modify it or what it returns.
type Snapshot struct {
	// Generation counts the snapshots a Store has held; it helps logs and
	// tests tell snapshots apart.
	Generation uint64

	nodes     []Node
	workloads []*Workload
	services  []*Service
	byIP      map[netip.Addr]*Workload
	byUID     map[string]*Workload
	byVIP     map[netip.AddrPort]svcPort
	nodeIPs   map[netip.Addr]string
}

type svcPort struct {
	svc  *Service
	port ServicePort
}

// ErrInvalid is wrapped by New's errors: the objects contradict each other.
var ErrInvalid = errors.New("invalid snapshot")

// New builds a snapshot. It returns an error wrapping ErrInvalid when two
// workloads share a UID or an IP, two services share a VIP:port, or a
// workload has no IP.
func New(nodes []Node, workloads []Workload, services []Service) (*Snapshot, error) {
	ws := make([]*Workload, len(workloads))
	for i := range workloads {
		w := workloads[i]
		w.IPs = slices.Clone(w.IPs)
		ws[i] = &w
	}
	return build(nodes, ws, services)
}

// NewShared is New for workloads the caller will never change, which
// the snapshot then holds as they are instead of copies: a source that
// builds one snapshot after another shares the workloads of unchanged
// pods between them (readers compare them by pointer to skip work).
func NewShared(nodes []Node, workloads []*Workload, services []Service) (*Snapshot, error) {
	return build(nodes, slices.Clone(workloads), services)
}

func build(nodes []Node, workloads []*Workload, services []Service) (*Snapshot, error) {
	s := &Snapshot{
		byIP:    make(map[netip.Addr]*Workload, len(workloads)),
		byUID:   make(map[string]*Workload, len(workloads)),
		byVIP:   make(map[netip.AddrPort]svcPort),
		nodeIPs: make(map[netip.Addr]string, len(nodes)),
	}
	s.nodes = slices.Clone(nodes)
	slices.SortFunc(s.nodes, func(a, b Node) int { return cmp.Compare(a.Name, b.Name) })
	for _, n := range s.nodes {
		if n.IP.IsValid() {
			s.nodeIPs[n.IP] = n.Name
		}
	}
	for _, wp := range workloads {
		if len(wp.IPs) == 0 {
			return nil, fmt.Errorf("%w: workload %s has no IP", ErrInvalid, wp)
		}
		if _, dup := s.byUID[wp.UID]; dup {
			return nil, fmt.Errorf("%w: workload %s: duplicate UID %q", ErrInvalid, wp, wp.UID)
		}
		for _, ip := range wp.IPs {
			if other, dup := s.byIP[ip]; dup {
				return nil, fmt.Errorf("%w: workloads %s and %s share IP %s", ErrInvalid, other, wp, ip)
			}
		}
		s.byUID[wp.UID] = wp
		for _, ip := range wp.IPs {
			s.byIP[ip] = wp
		}
	}
	s.workloads = workloads
	if !slices.IsSortedFunc(s.workloads, compareWorkloads) {
		slices.SortFunc(s.workloads, compareWorkloads)
	}
	for i := range services {
		svc := services[i]
		svc.VIPs = slices.Clone(svc.VIPs)
		svc.Ports = slices.Clone(svc.Ports)
		svc.Endpoints = slices.Clone(svc.Endpoints)
		sp := &svc
		for _, vip := range svc.VIPs {
			for _, p := range svc.Ports {
				ap := netip.AddrPortFrom(vip, p.Port)
				if other, dup := s.byVIP[ap]; dup {
					return nil, fmt.Errorf("%w: services %s and %s share %s", ErrInvalid, other.svc, sp, ap)
				}
				if p.TargetPort == 0 {
					p.TargetPort = p.Port
				}
				s.byVIP[ap] = svcPort{svc: sp, port: p}
			}
		}
		s.services = append(s.services, sp)
	}
	return s, nil
}

func compareWorkloads(a, b *Workload) int {
	return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}

// Empty is the snapshot of a cluster with nothing in it.
func Empty() *Snapshot {
	s, _ := New(nil, nil, nil)
	return s
}

// Workloads returns every workload, sorted by namespace and name.
func (s *Snapshot) Workloads() []*Workload { return s.workloads }

// Services returns every service.
func (s *Snapshot) Services() []*Service { return s.services }

// Nodes returns every node, sorted by name.
func (s *Snapshot) Nodes() []Node { return s.nodes }

// WorkloadByIP returns the workload that owns ip, or nil.
func (s *Snapshot) WorkloadByIP(ip netip.Addr) *Workload { return s.byIP[ip.Unmap()] }

// WorkloadByUID returns the workload with that UID, or nil.
func (s *Snapshot) WorkloadByUID(uid string) *Workload { return s.byUID[uid] }

// NodeByIP returns the name of the node whose underlay address is ip.
func (s *Snapshot) NodeByIP(ip netip.Addr) (string, bool) {
	n, ok := s.nodeIPs[ip.Unmap()]
	return n, ok
}

// LocalWorkloads returns the workloads that run on node.
func (s *Snapshot) LocalWorkloads(node string) []*Workload {
	var out []*Workload
	for _, w := range s.workloads {
		if w.Node == node {
			out = append(out, w)
		}
	}
	return out
}

// ResolveService maps a service VIP:port to one endpoint. pick chooses among
// the endpoints (callers pass a per-connection hash or counter). It returns
// ok=false when dst is no service's, or the service has no endpoint with an
// IP.
func (s *Snapshot) ResolveService(dst netip.AddrPort, pick uint32) (svc *Service, ep netip.AddrPort, w *Workload, ok bool) {
	sp, found := s.byVIP[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	if !found || len(sp.svc.Endpoints) == 0 {
		return nil, netip.AddrPort{}, nil, false
	}
	n := len(sp.svc.Endpoints)
	for i := range n {
		w := s.byUID[sp.svc.Endpoints[(int(pick)+i)%n]]
		if w != nil {
			return sp.svc, netip.AddrPortFrom(w.IPs[0], sp.port.TargetPort), w, true
		}
	}
	return nil, netip.AddrPort{}, nil, false
}

// Store holds the current snapshot. Load is lock-free; Replace swaps the
// whole snapshot and notifies subscribers.
type Store struct {
	cur  atomic.Pointer[Snapshot]
	gen  atomic.Uint64
	subs atomic.Pointer[[]chan struct{}]
}

// NewStore returns a store that holds an empty snapshot.
func NewStore() *Store {
	st := &Store{}
	st.cur.Store(Empty())
	return st
}

// Load returns the current snapshot; never nil.
func (st *Store) Load() *Snapshot {
	if s := st.cur.Load(); s != nil {
		return s
	}
	return Empty()
}

// Replace makes s the current snapshot, stamping its Generation, and wakes
// every subscriber.
func (st *Store) Replace(s *Snapshot) {
	s.Generation = st.gen.Add(1)
	st.cur.Store(s)
	if subs := st.subs.Load(); subs != nil {
		for _, c := range *subs {
			select {
			case c <- struct{}{}:
			default: // a wake-up is already pending
			}
		}
	}
}

// Subscribe returns a channel that receives a value (coalesced) after every
// Replace. Subscribe is meant for start-up wiring, not the hot path.
func (st *Store) Subscribe() <-chan struct{} {
	c := make(chan struct{}, 1)
	for {
		old := st.subs.Load()
		var next []chan struct{}
		if old != nil {
			next = slices.Clone(*old)
		}
		next = append(next, c)
		if st.subs.CompareAndSwap(old, &next) {
			return c
		}
	}
}
