package kubernetes

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/mantlet/mantlet/source/file"
)

// Bounds of the addresses announced ahead of the kubelet (Announce).
const (
	// MaxAnnounced is how many pods may have announced addresses at once
	// (a node runs at most a few hundred pods).
	MaxAnnounced = 1024
	// AnnouncedTTL is how long an announcement of a pod the informer never
	// shows is kept.
	AnnouncedTTL = 5 * time.Minute
)

// announced is a pod's addresses as its node's CNI plugin reported them.
type announced struct {
	uid string
	ips []netip.Addr
	at  time.Time
}

// Announce records that the pod ns/name (of UID uid, if not empty) has the
// addresses ips before the kubelet writes them in the pod's status: the
// node's CNI plugin reports them while the pod's sandbox is being made,
// and the pod must be enrolled before its containers start. States carry
// these addresses for the pod until its status shows them (or it is
// deleted, or Withdraw is called). It fails when MaxAnnounced pods have
// announcements already.
func (s *Source) Announce(ns, name, uid string, ips []netip.Addr) error {
	if len(ips) == 0 {
		return fmt.Errorf("kubernetes: announce %s/%s: no address", ns, name)
	}
	key := ns + "/" + name
	s.hintMu.Lock()
	if s.hints == nil {
		s.hints = map[string]announced{}
	}
	if _, ok := s.hints[key]; !ok && len(s.hints) >= MaxAnnounced {
		s.expireHints(time.Now())
		if len(s.hints) >= MaxAnnounced {
			s.hintMu.Unlock()
			return fmt.Errorf("kubernetes: announce %s: %d pods wait for their status already", key, MaxAnnounced)
		}
	}
	s.hints[key] = announced{uid: uid, ips: ips, at: time.Now()}
	s.hintMu.Unlock()
	s.notify()
	return nil
}

// Withdraw forgets the announcement of the pod ns/name (its sandbox is
// gone); uid, if not empty, must match the announcement's.
func (s *Source) Withdraw(ns, name, uid string) {
	key := ns + "/" + name
	s.hintMu.Lock()
	h, ok := s.hints[key]
	if ok && (uid == "" || h.uid == "" || h.uid == uid) {
		delete(s.hints, key)
	}
	s.hintMu.Unlock()
	if ok {
		s.notify()
	}
}

// expireHints drops the announcements older than AnnouncedTTL. Called
// with hintMu held.
func (s *Source) expireHints(now time.Time) {
	for k, h := range s.hints {
		if now.Sub(h.at) > AnnouncedTTL {
			delete(s.hints, k)
		}
	}
}

// withAnnounced gives the pods that have an announcement its addresses,
// and drops the announcements the pods' status has caught up with. pods
// is the lister's fresh slice; the pods themselves are shared and never
// changed (announced ones are copied).
func (s *Source) withAnnounced(pods []*file.Pod) []*file.Pod {
	s.hintMu.Lock()
	defer s.hintMu.Unlock()
	if len(s.hints) == 0 {
		return pods
	}
	s.expireHints(time.Now())
	for i, p := range pods {
		key := p.Namespace + "/" + p.Name
		h, ok := s.hints[key]
		if !ok || (h.uid != "" && h.uid != p.UID) {
			continue // none, or for a newer pod of that name than the informer has
		}
		if p.PodIP == h.ips[0].String() {
			delete(s.hints, key) // the kubelet reported it
			continue
		}
		cp := *p
		cp.PodIP = h.ips[0].String()
		cp.PodIPs = make([]string, len(h.ips))
		for j, ip := range h.ips {
			cp.PodIPs[j] = ip.String()
		}
		pods[i] = &cp
	}
	return pods
}
