package main

import (
	"context"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TestThePluginLeavesOnlyWithItsDaemonSet: an agent that stops takes its
// CNI plugin out of the node's network only when mantlet is being
// uninstalled (its DaemonSet gone, being deleted, or its access revoked);
// a restart keeps it, and so does an API server that cannot say.
func TestThePluginLeavesOnlyWithItsDaemonSet(t *testing.T) {
	ds := func(deleting bool) *appsv1.DaemonSet {
		d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "mantlet-system", Name: "mantlet-agent"}}
		if deleting {
			d.DeletionTimestamp = &metav1.Time{}
		}
		return d
	}
	gr := schema.GroupResource{Group: "apps", Resource: "daemonsets"}
	for _, tc := range []struct {
		name       string
		objs       []runtime.Object
		err        error
		wantRemove bool
		why        string
	}{
		{"a restart", []runtime.Object{ds(false)}, nil, false, "stays (a restart or an upgrade)"},
		{"helm uninstall, foreground", []runtime.Object{ds(true)}, nil, true, "is being deleted"},
		{"helm uninstall, DaemonSet gone", nil, nil, true, "is gone"},
		{"access revoked", nil, apierrors.NewForbidden(gr, "mantlet-agent", nil), true, "access to the API server was removed"},
		{"the API server does not answer", nil, apierrors.NewServiceUnavailable("down"), false, "cannot tell"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := fake.NewClientset(tc.objs...)
			if tc.err != nil {
				client.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) { return true, nil, tc.err })
			}
			remove, why := daemonSetGone(context.Background(), client, "mantlet-system", "mantlet-agent")
			if remove != tc.wantRemove || !strings.Contains(why, tc.why) {
				t.Errorf("remove=%v (%s), want %v (%s)", remove, why, tc.wantRemove, tc.why)
			}
		})
	}
}
