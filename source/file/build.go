package file

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// builtinNamespaces exist in every cluster, so pods may use them without a
// Namespace object in the file.
var builtinNamespaces = []string{"default", "kube-system", "kube-public", "kube-node-lease"}

// namespaceInfo is what pods need to know of their namespace.
type namespaceInfo struct {
	meshed bool
}

// owner remembers which object claimed a name or an address first.
type owner struct{ loc *Location }

func (o owner) String() string {
	s := o.loc.String()
	return strings.TrimPrefix(s, o.loc.File+": ")
}

// trustDomain reads an object's AnnotationTrustDomain: zero when absent;
// an invalid name is an error, reported against the annotation.
func (p *parser) trustDomain(loc Location, annotations map[string]string) (spiffeid.TrustDomain, bool) {
	v, ok := annotations[AnnotationTrustDomain]
	if !ok {
		return spiffeid.TrustDomain{}, true
	}
	td, err := spiffeid.TrustDomainFromString(v)
	if err != nil || strings.Contains(v, "/") {
		p.errorf(loc, annotationField(AnnotationTrustDomain), v, "want a trust domain name such as b.example (lower-case letters, digits, '.', '-', '_')")
		return spiffeid.TrustDomain{}, false
	}
	return td, true
}

// build validates the decoded objects against each other and makes the
// snapshot. Problems go to p.errs.
func (p *parser) build() *Manifest {
	m := &Manifest{File: p.file, MTLS: map[string]v1alpha1.MTLSMode{}, Extra: p.extra}
	names := map[string]owner{} // kind/namespace/name
	dup := func(loc Location) bool {
		if p.lenient {
			// An API server's objects: names and UIDs are unique by
			// construction, and a build of 10,000 pods on every change
			// should not spend a fifth of its time proving it.
			return false
		}
		key := loc.Kind + "/" + loc.Namespace + "/" + loc.Name
		if first, ok := names[key]; ok {
			p.errorf(loc, "metadata.name", loc.Name, "duplicate: %s has the same kind, namespace and name", first)
			return true
		}
		first := loc // only here: taking loc's address would move every caller's copy to the heap
		names[key] = owner{&first}
		return false
	}
	ips := map[netip.Addr]owner{} // pod, node and service addresses
	// claim records that the object at loc (which lives as long as the
	// build) has ip, unless another one has; field names where it says
	// so, for the message (a format with %d for i, or a name).
	claim := func(loc *Location, field string, i int, ip netip.Addr) bool {
		if first, ok := ips[ip]; ok {
			if strings.Contains(field, "%d") {
				field = fmt.Sprintf(field, i)
			}
			p.errorf(*loc, field, ip.String(), "address already used by %s", first)
			return false
		}
		ips[ip] = owner{loc}
		return true
	}

	namespaces := map[string]namespaceInfo{}
	for _, n := range builtinNamespaces {
		namespaces[n] = namespaceInfo{}
	}
	for _, e := range p.namespaces {
		ns, loc := e.obj, e.loc
		if !p.checkName(loc, "metadata.name", ns.Name, validation.IsDNS1123Label) || dup(loc) {
			continue
		}
		info := namespaceInfo{}
		switch v, ok := ns.Annotations[AnnotationMesh]; {
		case !ok, v == meshDisabled:
		case v == meshEnabled:
			info.meshed = true
		default:
			p.errorf(loc, annotationField(AnnotationMesh), v, "want %q or %q", meshEnabled, meshDisabled)
		}
		if v, ok := ns.Annotations[AnnotationMTLS]; ok {
			if mode, err := v1alpha1.ParseMTLSMode(v); err != nil {
				p.errorf(loc, annotationField(AnnotationMTLS), v, "want STRICT or PERMISSIVE")
			} else {
				m.MTLS[ns.Name] = mode
			}
		}
		namespaces[ns.Name] = info
	}

	nodeIPs := map[string]nodeInfo{}
	var nodes []workload.Node
	for k := range p.nodes {
		n, loc := p.nodes[k].obj, p.nodes[k].loc
		if !p.checkName(loc, "metadata.name", n.Name, validation.IsDNS1123Subdomain) || dup(loc) {
			continue
		}
		var info nodeInfo
		info.td, _ = p.trustDomain(loc, n.Annotations)
		for i, a := range n.Status.Addresses {
			if a.Type != corev1.NodeInternalIP {
				continue
			}
			ip, ok := p.parseIP(loc, fmt.Sprintf("status.addresses[%d].address", i), a.Address)
			if ok && claim(&p.nodes[k].loc, "status.addresses[%d].address", i, ip) {
				info.ips = append(info.ips, ip)
			}
		}
		if len(info.ips) == 0 {
			if !slices.ContainsFunc(n.Status.Addresses, func(a corev1.NodeAddress) bool { return a.Type == corev1.NodeInternalIP }) {
				p.errorf(loc, "status.addresses", "", "no InternalIP (want an entry with type: InternalIP and the node's underlay address)")
			}
			continue
		}
		nodeIPs[n.Name] = info
		nodes = append(nodes, workload.Node{Name: n.Name, IP: info.ips[0], TrustDomain: info.td})
	}

	workloads := make([]*workload.Workload, 0, len(p.pods))
	pods := map[string][]*Pod{} // namespace → pods in the snapshot, for selectors
	uids := map[string]owner{}
	if p.cache != nil {
		p.cache.gen++
	}
	for k := range p.pods {
		pod, loc := p.pods[k].obj, p.pods[k].loc
		if !p.checkName(loc, "metadata.name", pod.Name, validation.IsDNS1123Subdomain) ||
			!p.checkName(loc, "metadata.namespace", loc.Namespace, validation.IsDNS1123Label) || dup(loc) {
			continue
		}
		w, ok := p.cachedPod(loc, pod, namespaces, nodeIPs)
		if !ok || w == nil {
			continue
		}
		if !p.lenient {
			if first, ok := uids[w.UID]; ok {
				p.errorf(loc, "metadata.uid", w.UID, "already used by %s", first)
				continue
			}
			uids[w.UID] = owner{&p.pods[k].loc}
		}
		clean := true
		field := "status.podIP"
		if len(pod.PodIPs) > 0 {
			field = "status.podIPs[%d].ip"
		}
		for i, ip := range w.IPs {
			clean = claim(&p.pods[k].loc, field, i, ip) && clean
		}
		if !clean {
			continue
		}
		workloads = append(workloads, w)
		pods[loc.Namespace] = append(pods[loc.Namespace], pod)
		if p.endpoints != nil {
			p.podByUID[pod.UID] = indexedPod{pod, len(workloads)}
		}
	}

	var services []workload.Service
	vips := map[netip.AddrPort]owner{}
	for k := range p.services {
		svc, loc := p.services[k].obj, p.services[k].loc
		if !p.checkName(loc, "metadata.name", svc.Name, validation.IsDNS1035Label) ||
			!p.checkName(loc, "metadata.namespace", loc.Namespace, validation.IsDNS1123Label) || dup(loc) {
			continue
		}
		s, ok := p.service(loc, svc, pods[loc.Namespace])
		if !ok || s == nil {
			continue
		}
		clean := true
		for _, vip := range s.VIPs {
			if first, ok := ips[vip]; ok {
				p.errorf(loc, "spec.clusterIP", vip.String(), "address already used by %s", first)
				clean = false
				continue
			}
			for _, sp := range s.Ports {
				ap := netip.AddrPortFrom(vip, sp.Port)
				if first, ok := vips[ap]; ok {
					p.errorf(loc, "spec.clusterIP", vip.String(), "address already used by %s", first)
					clean = false
					break
				}
				vips[ap] = owner{&p.services[k].loc}
			}
		}
		if clean {
			services = append(services, *s)
		}
	}
	if p.lenient {
		p.warnings = append(p.warnings, p.errs...)
		p.errs = nil
	}
	if len(p.errs) > 0 {
		return nil
	}
	p.cache.sweep()
	snap, err := workload.NewShared(nodes, workloads, services)
	if err != nil {
		// The checks above should have caught every contradiction New
		// knows; report it against the file rather than panic.
		p.errorf(Location{File: p.file}, "", "", "%v", err)
		return nil
	}
	m.Snapshot = snap
	m.Warnings = p.warnings
	return m
}

// nodeInfo is what pods need to know of their node.
type nodeInfo struct {
	ips []netip.Addr
	td  spiffeid.TrustDomain
}

// PodCache remembers the workloads that builds made of pods, so that a
// build reuses the workload of a pod that did not change (the same *Pod,
// in a namespace and on a node that say the same as before) instead of
// making it again, and snapshots share it. A source that builds state
// after state from objects it keeps (the Kubernetes source's informers)
// gives every build the same cache; builds that share one must not run
// at once. The zero value is ready to use.
type PodCache struct {
	gen uint64
	m   map[*Pod]cachedWorkload
}

// cachedWorkload is a workload made of a pod, and what else it was made
// from.
type cachedWorkload struct {
	gen       uint64 // the last build that used it
	ns        namespaceInfo
	nsKnown   bool
	node      nodeInfo
	nodeKnown bool
	w         *workload.Workload
}

// sweep forgets the pods the last build did not see.
func (c *PodCache) sweep() {
	if c == nil {
		return
	}
	for k, e := range c.m {
		if e.gen != c.gen {
			delete(c.m, k)
		}
	}
}

// cachedPod is pod (below) through p.cache: a workload made of the same
// pod in the same namespace and node information is reused. A pod whose
// build found problems is not cached, so that they are reported again.
func (p *parser) cachedPod(loc Location, pod *Pod, namespaces map[string]namespaceInfo, nodes map[string]nodeInfo) (*workload.Workload, bool) {
	ns, nsKnown := namespaces[loc.Namespace]
	node, nodeKnown := nodes[pod.NodeName]
	c := p.cache
	if c != nil {
		if e, ok := c.m[pod]; ok && e.ns == ns && e.nsKnown == nsKnown && e.nodeKnown == nodeKnown &&
			e.node.td == node.td && slices.Equal(e.node.ips, node.ips) {
			e.gen = c.gen
			c.m[pod] = e
			return e.w, true
		}
	}
	problems := len(p.errs) + len(p.warnings)
	w, ok := p.pod(loc, pod, namespaces, func(node string) ([]netip.Addr, bool) {
		n, ok := nodes[node]
		return n.ips, ok
	})
	if ok && w != nil && w.TrustDomain.IsZero() {
		w.TrustDomain = nodes[w.Node].td
	}
	if c != nil && ok && w != nil && problems == len(p.errs)+len(p.warnings) {
		if c.m == nil {
			c.m = map[*Pod]cachedWorkload{}
		}
		c.m[pod] = cachedWorkload{gen: c.gen, ns: ns, nsKnown: nsKnown, node: node, nodeKnown: nodeKnown, w: w}
	}
	return w, ok
}

func annotationField(key string) string { return fmt.Sprintf("metadata.annotations[%q]", key) }

// checkName validates a name with one of Kubernetes' validators. Names
// from an API server (BuildObjects) were validated there already.
func (p *parser) checkName(loc Location, field, name string, valid func(string) []string) bool {
	if p.lenient && name != "" {
		return true
	}
	if name == "" {
		p.errorf(loc, field, "", "missing")
		return false
	}
	if msgs := valid(name); len(msgs) > 0 {
		p.errorf(loc, field, name, "%s", strings.Join(msgs, "; "))
		return false
	}
	return true
}

// parseIP parses an address the way a user means it: no zone, not
// loopback, multicast or unspecified.
func (p *parser) parseIP(loc Location, field, s string) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(s)
	switch {
	case s == "":
		p.errorf(loc, field, "", "missing")
	case err != nil:
		p.errorf(loc, field, s, "not an IP address")
	case ip.Zone() != "":
		p.errorf(loc, field, s, "an address with a zone cannot be used; write the address alone")
	case ip.IsUnspecified(), ip.IsLoopback(), ip.IsMulticast():
		p.errorf(loc, field, s, "not a unicast address a pod or node can have")
	default:
		return ip.Unmap(), true
	}
	return netip.Addr{}, false
}

// pod turns a Pod into a workload. It returns nil, true for pods that hold
// no address of their own (finished, pending without an IP, host network).
func (p *parser) pod(loc Location, pod *Pod, namespaces map[string]namespaceInfo, nodeIPs func(string) ([]netip.Addr, bool)) (*workload.Workload, bool) {
	if pod.Phase == corev1.PodSucceeded || pod.Phase == corev1.PodFailed || pod.HostNetwork {
		return nil, true
	}
	if pod.PodIP == "" && len(pod.PodIPs) == 0 && pod.Phase == corev1.PodPending {
		return nil, true
	}
	ok := true
	ns, known := namespaces[loc.Namespace]
	if !known {
		p.errorf(loc, "metadata.namespace", loc.Namespace, "no Namespace object of that name in the file (add one; annotate it %s: %s to mesh its pods)", AnnotationMesh, meshEnabled)
		ok = false
	}
	enrolled := ns.meshed
	switch v, set := pod.Annotations[AnnotationMesh]; {
	case !set:
	case v == meshDisabled:
		enrolled = false
	case v == meshEnabled:
		if !ns.meshed && known {
			p.warnf(loc, annotationField(AnnotationMesh), v, "has no effect on a pod; annotate Namespace %s to mesh its pods", loc.Namespace)
		}
	default:
		p.errorf(loc, annotationField(AnnotationMesh), v, "want %q (opt this pod out) or %q", meshDisabled, meshEnabled)
		ok = false
	}
	td, good := p.trustDomain(loc, pod.Annotations)
	ok = ok && good
	sa := pod.ServiceAccountName
	saField := "spec.serviceAccountName"
	if sa == "" {
		sa, saField = pod.DeprecatedServiceAccount, "spec.serviceAccount"
	}
	if sa == "" {
		sa = "default"
	} else if !p.checkName(loc, saField, sa, validation.IsDNS1123Subdomain) {
		ok = false
	}

	var ips []netip.Addr
	switch {
	case pod.PodIP == "" && len(pod.PodIPs) == 0:
		p.errorf(loc, "status.podIP", "", "missing (want the pod's address, e.g. \"198.19.1.10\"; pods without one must have status.phase Pending)")
		ok = false
	case len(pod.PodIPs) == 0:
		if ip, good := p.parseIP(loc, "status.podIP", pod.PodIP); good {
			ips = append(ips, ip)
		} else {
			ok = false
		}
	default:
		if pod.PodIP != "" {
			if _, good := p.parseIP(loc, "status.podIP", pod.PodIP); !good {
				ok = false
				break
			}
			if pod.PodIP != pod.PodIPs[0] {
				p.errorf(loc, "status.podIPs[0].ip", pod.PodIPs[0], "must equal status.podIP %q", pod.PodIP)
				ok = false
				break
			}
		}
		for i, a := range pod.PodIPs {
			ip, good := p.parseIP(loc, fmt.Sprintf("status.podIPs[%d].ip", i), a)
			switch {
			case !good:
				ok = false
			case slices.Contains(ips, ip):
				p.errorf(loc, fmt.Sprintf("status.podIPs[%d].ip", i), a, "listed twice")
				ok = false
			default:
				ips = append(ips, ip)
			}
		}
	}

	nodeName := pod.NodeName
	var nodeIP netip.Addr
	if nodeName == "" {
		p.errorf(loc, "spec.nodeName", "", "missing (want the name of the node the pod runs on)")
		ok = false
	} else if !p.checkName(loc, "spec.nodeName", nodeName, validation.IsDNS1123Subdomain) {
		ok = false
	} else {
		known, haveNode := nodeIPs(nodeName)
		var hostIP netip.Addr
		if pod.HostIP != "" {
			var good bool
			if hostIP, good = p.parseIP(loc, "status.hostIP", pod.HostIP); !good {
				ok = false
			}
		}
		switch {
		case haveNode && hostIP.IsValid() && !slices.Contains(known, hostIP):
			p.errorf(loc, "status.hostIP", pod.HostIP, "is not an InternalIP of Node %s (%s)", nodeName, joinAddrs(known))
			ok = false
		case haveNode:
			nodeIP = known[0]
		case hostIP.IsValid():
			nodeIP = hostIP
		case pod.HostIP == "":
			p.errorf(loc, "spec.nodeName", nodeName, "no Node object of that name and no status.hostIP (add a Node with an InternalIP, or set status.hostIP)")
			ok = false
		}
	}
	if !ok {
		return nil, false
	}
	uid := pod.UID
	if uid == "" {
		uid = loc.Namespace + "/" + pod.Name
	}
	return &workload.Workload{
		UID:            uid,
		Name:           pod.Name,
		Namespace:      loc.Namespace,
		ServiceAccount: sa,
		Labels:         pod.Labels,
		Node:           nodeName,
		NodeIP:         nodeIP,
		TrustDomain:    td,
		IPs:            ips,
		Enrolled:       enrolled,
	}, true
}

func joinAddrs(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ", ")
}

// service turns a Service into a workload.Service whose endpoints are the
// pods (of the snapshot, same namespace) that its selector matches. It
// returns nil, true for services mantlet ignores (ExternalName).
func (p *parser) service(loc Location, svc *corev1.Service, pods []*Pod) (*workload.Service, bool) {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, true
	}
	ok := true
	var vips []netip.Addr
	headless := svc.Spec.ClusterIP == corev1.ClusterIPNone
	switch {
	case svc.Spec.ClusterIP == "" && len(svc.Spec.ClusterIPs) == 0:
		p.errorf(loc, "spec.clusterIP", "", "missing (want the service's virtual IP, e.g. \"198.18.128.10\", or \"None\" for a headless service)")
		ok = false
	case headless:
		if len(svc.Spec.ClusterIPs) > 1 || (len(svc.Spec.ClusterIPs) == 1 && svc.Spec.ClusterIPs[0] != corev1.ClusterIPNone) {
			p.errorf(loc, "spec.clusterIPs", "", "must be [\"None\"] or absent when spec.clusterIP is \"None\"")
			ok = false
		}
	default:
		list, field := svc.Spec.ClusterIPs, "spec.clusterIPs[%d]"
		if len(list) == 0 {
			list, field = []string{svc.Spec.ClusterIP}, "spec.clusterIP"
		} else if svc.Spec.ClusterIP != "" && svc.Spec.ClusterIP != list[0] {
			p.errorf(loc, "spec.clusterIPs[0]", list[0], "must equal spec.clusterIP %q", svc.Spec.ClusterIP)
			ok = false
		}
		for i, s := range list {
			f := field
			if strings.Contains(f, "%d") {
				f = fmt.Sprintf(field, i)
			}
			ip, good := p.parseIP(loc, f, s)
			switch {
			case !good:
				ok = false
			case slices.Contains(vips, ip):
				p.errorf(loc, f, s, "listed twice")
				ok = false
			default:
				vips = append(vips, ip)
			}
		}
	}

	var endpoints []*Pod
	if p.endpoints != nil {
		// The ready endpoints that are pods of the snapshot, in the pods'
		// order (a lookup each: scanning the namespace's pods for every
		// service cost services × pods × endpoints comparisons).
		var found []indexedPod
		for _, uid := range p.endpoints[loc.Namespace+"/"+svc.Name] {
			if ip, ok := p.podByUID[uid]; ok && ip.pod.Namespace == loc.Namespace {
				found = append(found, ip)
			}
		}
		slices.SortFunc(found, func(a, b indexedPod) int { return a.i - b.i })
		for i, ip := range found {
			if i == 0 || found[i-1].i != ip.i { // a pod listed by two slices
				endpoints = append(endpoints, ip.pod)
			}
		}
	} else if len(svc.Spec.Selector) > 0 {
		for _, pod := range pods {
			if matches(svc.Spec.Selector, pod.Labels) {
				endpoints = append(endpoints, pod)
			}
		}
	}

	var ports []workload.ServicePort
	seen := map[int32]int{}
	for i, sp := range svc.Spec.Ports {
		field := fmt.Sprintf("spec.ports[%d]", i)
		if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
			continue // the mesh carries TCP only
		}
		if sp.Port < 1 || sp.Port > 65535 {
			p.errorf(loc, field+".port", fmt.Sprint(sp.Port), "want a port number from 1 to 65535")
			ok = false
			continue
		}
		if j, dup := seen[sp.Port]; dup {
			p.errorf(loc, field+".port", fmt.Sprint(sp.Port), "spec.ports[%d] has the same port", j)
			ok = false
			continue
		}
		seen[sp.Port] = i
		target, good := p.targetPort(loc, field+".targetPort", sp, endpoints)
		if !good {
			ok = false
			continue
		}
		ports = append(ports, workload.ServicePort{Name: sp.Name, Port: uint16(sp.Port), TargetPort: target})
	}
	if !ok {
		return nil, false
	}
	s := &workload.Service{Name: svc.Name, Namespace: loc.Namespace, VIPs: vips, Ports: ports}
	for _, pod := range endpoints {
		uid := pod.UID
		if uid == "" {
			uid = loc.Namespace + "/" + pod.Name
		}
		s.Endpoints = append(s.Endpoints, uid)
	}
	return s, true
}

// targetPort resolves a service port's targetPort to a number: numeric
// ones directly, named ones through the container ports of the selected
// pods, which must agree.
func (p *parser) targetPort(loc Location, field string, sp corev1.ServicePort, endpoints []*Pod) (uint16, bool) {
	tp := sp.TargetPort
	if tp.Type == intstr.Int {
		switch {
		case tp.IntVal == 0:
			return uint16(sp.Port), true
		case tp.IntVal < 1 || tp.IntVal > 65535:
			p.errorf(loc, field, fmt.Sprint(tp.IntVal), "want a port number from 1 to 65535 or a container port name")
			return 0, false
		}
		return uint16(tp.IntVal), true
	}
	name := tp.StrVal
	if msgs := validation.IsValidPortName(name); len(msgs) > 0 {
		p.errorf(loc, field, name, "want a port number from 1 to 65535 or a container port name: %s", strings.Join(msgs, "; "))
		return 0, false
	}
	var found int32
	var foundOn string
	for _, pod := range endpoints {
		for _, cp := range pod.Ports {
			if cp.Name != name || (cp.Protocol != "" && cp.Protocol != corev1.ProtocolTCP) {
				continue
			}
			switch {
			case found == 0:
				found, foundOn = cp.ContainerPort, pod.Name
			case cp.ContainerPort != found:
				p.errorf(loc, field, name, "means port %d on pod %s but %d on pod %s; mantlet needs one number per service port (use a number)", found, foundOn, cp.ContainerPort, pod.Name)
				return 0, false
			}
		}
	}
	switch {
	case len(endpoints) == 0:
		return uint16(sp.Port), true // nothing to resolve against; no endpoint will be used
	case found == 0:
		p.errorf(loc, field, name, "no selected pod has a TCP container port of that name (name one in spec.containers[].ports, or use a number)")
		return 0, false
	case found < 1 || found > 65535:
		p.errorf(loc, field, name, "means port %d on pod %s, not a port number from 1 to 65535", found, foundOn)
		return 0, false
	}
	return uint16(found), true
}

// matches reports whether labels satisfy every key of selector.
func matches(selector, labels map[string]string) bool {
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}
