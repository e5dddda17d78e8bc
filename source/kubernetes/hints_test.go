package kubernetes

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// TestAnnouncedAddressesEnrollAPodBeforeItsStatusHasThem: a pod that the
// scheduler placed but whose status has no address yet (its sandbox is
// being made) is in the state with the address its CNI plugin announced,
// meshed as its namespace says; once its status shows the address the
// announcement is dropped; a withdrawn announcement takes the pod out
// again.
func TestAnnouncedAddressesEnrollAPodBeforeItsStatusHasThem(t *testing.T) {
	pending := pod("shop", "new", "new", "node1", "", nil)
	pending.Status.Phase = corev1.PodPending
	other := pod("plain", "other", "other", "node1", "", nil)
	other.Status.Phase = corev1.PodPending
	f, first := newFixture(t, []runtime.Object{
		ns("shop", map[string]string{"mantlet.io/mesh": "enabled"}), ns("plain", nil),
		node("node1", "198.18.0.1"), pending, other,
	})
	ip := netip.MustParseAddr("198.19.1.30")
	if first.Snapshot.WorkloadByIP(ip) != nil {
		t.Fatal("a pod without an address is in the first state")
	}
	if err := f.src.Announce("shop", "new", "uid-new", []netip.Addr{ip}); err != nil {
		t.Fatal(err)
	}
	w := f.next(t).Snapshot.WorkloadByIP(ip)
	if w == nil || w.String() != "shop/new" || !w.Enrolled || w.ServiceAccount != "new" {
		t.Fatalf("after the announcement: %+v, want shop/new meshed with its service account", w)
	}
	// A pod of a namespace that is not meshed is in the state unmeshed,
	// so the plugin learns at once that it need not wait.
	if err := f.src.Announce("plain", "other", "", []netip.Addr{netip.MustParseAddr("198.19.1.31")}); err != nil {
		t.Fatal(err)
	}
	if w := f.next(t).Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.31")); w == nil || w.Enrolled {
		t.Fatalf("unmeshed namespace: %+v", w)
	}
	// An announcement for another pod of that name (a newer UID) is not
	// applied to the one the informer has.
	if err := f.src.Announce("plain", "other", "uid-newer", []netip.Addr{netip.MustParseAddr("198.19.1.32")}); err != nil {
		t.Fatal(err)
	}
	if st := f.next(t); st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.32")) != nil {
		t.Fatal("an announcement was applied to a pod of another UID")
	}

	// The kubelet reports the address: the pod stays in the state with
	// it, the announcement goes. (The status change may be emitted as a
	// state of its own: the source does not compare whole states.)
	ctx := context.Background()
	p, err := f.client.CoreV1().Pods("shop").Get(ctx, "new", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.ResourceVersion = "2"
	p.Status.Phase, p.Status.PodIP, p.Status.PodIPs = corev1.PodRunning, ip.String(), []corev1.PodIP{{IP: ip.String()}}
	if _, err := f.client.CoreV1().Pods("shop").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if w := f.next(t).Snapshot.WorkloadByIP(ip); w == nil || w.String() != "shop/new" || !w.Enrolled {
		t.Fatalf("after the kubelet reported the address: %+v, want shop/new meshed", w)
	}
	f.src.hintMu.Lock()
	_, kept := f.src.hints["shop/new"]
	f.src.hintMu.Unlock()
	if kept {
		t.Error("the announcement is kept after the pod's status showed its address")
	}
	f.src.Withdraw("plain", "other", "uid-newer")
	// The pod never showed that address: whether or not the withdrawal
	// is emitted as a state, no state has it.
	select {
	case st := <-f.states:
		if st.Snapshot.WorkloadByIP(netip.MustParseAddr("198.19.1.32")) != nil {
			t.Fatal("a withdrawn announcement is in the state")
		}
	case <-time.After(300 * time.Millisecond):
	}
	f.src.hintMu.Lock()
	n := len(f.src.hints)
	f.src.hintMu.Unlock()
	if n != 0 {
		t.Errorf("%d announcements left", n)
	}
}
