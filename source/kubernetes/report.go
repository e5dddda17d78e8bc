package kubernetes

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"time"
	"unicode/utf8"

	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/mantlet/mantlet/source"
)

// What the source writes back.
const (
	// ConditionAccepted on a MeshPolicy: True when the policy is in force,
	// False (reason Invalid) with the validation message otherwise.
	ConditionAccepted = "Accepted"
	// ConditionMeshed on a pod (a pod status condition): True when the
	// node captures the pod's traffic, False (reason Pending) with why not.
	ConditionMeshed corev1.PodConditionType = "mantlet.io/Meshed"
)

// Defaults of the write-back.
const (
	// DefaultReportEvery is how often desired and written status are
	// compared.
	DefaultReportEvery = time.Second
	// DefaultOverdue is how long a policy's status may stay behind before
	// any agent writes it, not only the one the policy falls to.
	DefaultOverdue = 10 * time.Second
	// reportRate bounds the patches an agent sends per second (bursts of
	// twice as many).
	reportRate = 20
)

var _ source.Reporter = (*Source)(nil)

// Report writes back, until ctx ends: the Accepted condition of every
// MeshPolicy (one agent per policy writes it, chosen by hashing the
// policy with the node names; any agent does once it is overdue), and the
// Meshed condition of this node's pods, at once when changed says the
// pods changed (a pod enrolled a moment ago is Meshed within the time of
// a patch, not of a period). Only what differs from the object is
// patched, at most 20 patches a second.
func (s *Source) Report(ctx context.Context, node string, pods func() []source.PodReport, changed <-chan struct{}) error {
	r := &reporter{s: s, node: node, pods: pods, limit: rate.NewLimiter(reportRate, 2*reportRate), behind: map[types.UID]time.Time{}}
	t := time.NewTicker(DefaultReportEvery)
	defer t.Stop()
	r.policies(ctx)
	r.meshed(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			r.meshed(ctx)
		case <-t.C:
			r.policies(ctx)
			r.meshed(ctx)
		}
	}
}

type reporter struct {
	s      *Source
	node   string
	pods   func() []source.PodReport
	limit  *rate.Limiter
	behind map[types.UID]time.Time // since when a policy's status lags
}

// policies brings the Accepted condition of every MeshPolicy in line.
func (r *reporter) policies(ctx context.Context) {
	objs, err := r.s.policies.List(labels.Everything())
	if err != nil {
		return
	}
	nodes, err := r.s.nodes.List(labels.Everything())
	if err != nil {
		return
	}
	invalid := r.s.InvalidPolicies()
	now := time.Now()
	seen := map[types.UID]bool{}
	for _, o := range objs {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		seen[u.GetUID()] = true
		want := AcceptedCondition(u.GetGeneration())
		if why, bad := invalid[u.GetNamespace()+"/"+u.GetName()]; bad {
			want.Status, want.Reason, want.Message = metav1.ConditionFalse, "Invalid", truncate(why)
		}
		conds := policyConditions(u)
		have := meta.FindStatusCondition(conds, ConditionAccepted)
		if have != nil && have.Status == want.Status && have.Reason == want.Reason && have.Message == want.Message &&
			have.ObservedGeneration == want.ObservedGeneration {
			delete(r.behind, u.GetUID())
			continue
		}
		since, lagging := r.behind[u.GetUID()]
		if !lagging {
			r.behind[u.GetUID()] = now
			since = now
		}
		if owner(string(u.GetUID()), nodes) != r.node && now.Sub(since) < DefaultOverdue {
			continue
		}
		if !r.limit.Allow() {
			return
		}
		meta.SetStatusCondition(&conds, want)
		body, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": conds}})
		_, err := r.s.dyn.Resource(MeshPolicies).Namespace(u.GetNamespace()).Patch(ctx, u.GetName(), types.MergePatchType, body, metav1.PatchOptions{}, "status")
		if err != nil {
			r.s.log.Warn("kubernetes: write the status of a MeshPolicy", "policy", u.GetNamespace()+"/"+u.GetName(), "error", err)
		}
	}
	for uid := range r.behind {
		if !seen[uid] {
			delete(r.behind, uid)
		}
	}
}

// AcceptedCondition is the condition the agents write on a MeshPolicy
// whose generation is in force.
func AcceptedCondition(generation int64) metav1.Condition {
	return metav1.Condition{Type: ConditionAccepted, Status: metav1.ConditionTrue, Reason: "Accepted",
		Message: "in force on the mesh", ObservedGeneration: generation}
}

// maxMessage is the longest message a condition may hold (metav1.Condition
// allows 32768 bytes).
const maxMessage = 32768

// truncate cuts a message to what a condition holds.
func truncate(msg string) string {
	const more = " (cut short)"
	if len(msg) <= maxMessage {
		return msg
	}
	cut := maxMessage - len(more)
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + more
}

// policyConditions reads status.conditions of a MeshPolicy.
func policyConditions(u *unstructured.Unstructured) []metav1.Condition {
	raw, found, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	if !found {
		return nil
	}
	js, err := json.Marshal(raw)
	if err != nil {
		return nil
	}
	var out []metav1.Condition
	_ = json.Unmarshal(js, &out)
	return out
}

// owner names the node whose agent writes the status of the object key:
// the one with the highest hash of key and node name.
func owner(key string, nodes []*corev1.Node) string {
	var best string
	var bestSum uint64
	for _, n := range nodes {
		h := fnv.New64a()
		fmt.Fprint(h, key, "/", n.Name)
		if sum := h.Sum64(); best == "" || sum > bestSum {
			best, bestSum = n.Name, sum
		}
	}
	return best
}

// meshed brings the Meshed condition of this node's pods in line.
func (r *reporter) meshed(ctx context.Context) {
	for _, p := range r.pods() {
		pod := r.s.pod(p.Namespace, p.Name)
		if pod == nil || p.UID != "" && pod.UID != p.UID {
			continue // gone, or another pod under the same name
		}
		want := corev1.PodCondition{Type: ConditionMeshed, Status: corev1.ConditionTrue, Reason: "Enrolled",
			Message: "traffic captured by mantlet, mTLS PERMISSIVE"}
		if p.Strict {
			want.Message = "traffic captured by mantlet, mTLS STRICT"
		}
		if !p.Enrolled {
			want.Status, want.Reason, want.Message = corev1.ConditionFalse, "Pending", p.Err
			if want.Message == "" {
				want.Message = "not enrolled yet"
			}
			if p.Reason != "" {
				want.Reason = p.Reason
			}
		}
		have := pod.meshed
		if have != nil && have.Status == want.Status && have.Reason == want.Reason && have.Message == want.Message {
			continue
		}
		if !r.limit.Allow() {
			return
		}
		want.LastTransitionTime = metav1.Now()
		if have != nil && have.Status == want.Status {
			want.LastTransitionTime = have.LastTransitionTime
		}
		// The UID makes the API server refuse the patch if the pod was
		// replaced by another of the same name since the cache saw it.
		body, _ := json.Marshal(map[string]any{"metadata": map[string]any{"uid": pod.UID},
			"status": map[string]any{"conditions": []corev1.PodCondition{want}}})
		if _, err := r.s.client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status"); err != nil {
			r.s.log.Warn("kubernetes: write the Meshed condition of a pod", "pod", p.Namespace+"/"+p.Name, "error", err)
		}
	}
}
